"""wandb through accelerate's tracker API: online with WANDB_API_KEY (or a stored login), offline otherwise."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from train.config_schema import TrackingConfig


def tracker_name(cfg: TrackingConfig) -> Optional[str]:
    """The ``log_with`` argument for Accelerator (None turns tracking off)."""
    return None if cfg.report_to == "none" else "wandb"


def choose_wandb_mode() -> None:
    """Offline unless the user asked otherwise or has credentials, so a run never blocks on a login prompt."""
    if "WANDB_MODE" in os.environ:
        return
    has_login = bool(os.environ.get("WANDB_API_KEY")) or _netrc_has_wandb()
    if not has_login:
        os.environ["WANDB_MODE"] = "offline"


def _netrc_has_wandb() -> bool:
    """`wandb login` stores the key in ~/.netrc under api.wandb.ai (a .netrc for git alone does not count)."""
    import netrc

    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def start(accelerator: Any, cfg: TrackingConfig, run_dir: Path, config: dict[str, Any]) -> None:
    if cfg.report_to == "none":
        return
    choose_wandb_mode()
    os.environ.setdefault("WANDB_DIR", str(run_dir))
    init = {"wandb": {"name": cfg.run_name or run_dir.name, "dir": str(run_dir)}}
    accelerator.init_trackers(cfg.project, config=config, init_kwargs=init)


def log_videos(accelerator: Any, cfg: TrackingConfig, step: int, videos: dict[str, Path], fps: float) -> None:
    """Log mp4 files (already written to the run folder) as wandb.Video on the main process."""
    if cfg.report_to == "none" or not accelerator.is_main_process or not videos:
        return
    import wandb

    run = accelerator.get_tracker("wandb", unwrap=True)
    run.log({f"validation/{name}": wandb.Video(str(path), fps=int(round(fps)), format="mp4") for name, path in videos.items()}, step=step)
