"""Inputs a recipe may ask the trainer to create: a tiny random-weight model and a synthetic video set.

Only the quickstart and smoke tests use this; real recipes point at Hub ids and real data.

Generated inputs only ever go where nothing of the user's can be hurt: a folder that does not exist yet (or is
empty), which then gets a marker file, ``.generated-by-longvideo``. A folder with the marker is ours and may be
(re)written; any other folder is refused, as is a name that looks like a Hub id (``org/name``), so that a random
model never shadows a real one in a later ``--model org/name``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Optional

from data.hub_ids import looks_local
from train.config import ConfigError, write_text_atomic
from train.config_schema import RecipeConfig

MARKER = ".generated-by-longvideo"


def read_marker(folder: Path) -> Optional[dict[str, Any]]:
    """What the marker of a generated folder says (None: no marker, i.e. not ours)."""
    path = Path(folder) / MARKER
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_marker(folder: Path, info: dict[str, Any]) -> None:
    write_text_atomic(folder / MARKER, json.dumps(info, sort_keys=True) + "\n")


def _is_empty_dir(folder: Path) -> bool:
    return folder.is_dir() and not any(folder.iterdir())


def _tiny_model_spec(cfg: RecipeConfig) -> dict[str, Any]:
    return {"kind": "tiny_random_model", "family": cfg.model.family, "seed": cfg.train.seed}


def _synthetic_spec(cfg: RecipeConfig) -> dict[str, Any]:
    syn = cfg.data.synthetic
    assert syn is not None
    return {"kind": "synthetic_videos", **{k: getattr(syn, k) for k in ("num_videos", "frames", "height", "width", "fps", "seed")}}


def _check_target(key: str, name: str, what: str) -> Path:
    """The folder ``name`` may receive generated ``what`` (or is ours already); else a ConfigError naming ``key``."""
    if not looks_local(name):
        raise ConfigError(
            f"{key}={name!r} looks like a Hub id, and {what} is only written to a local folder; use a path such as "
            f"./{name.replace('/', '-')} or runs/<name>/... (a generated folder must never shadow a Hub id)"
        )
    folder = Path(name).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{key}={name!r} is a file; {what} needs a folder")
    return folder


def check_generated_inputs(cfg: RecipeConfig) -> None:
    """Refuse, before anything is written, a generated input that would land where it must not."""
    if cfg.model.create_tiny_random:
        folder = _check_target("model.pretrained", cfg.model.pretrained, "a tiny random model")
        if folder.is_dir() and not _is_empty_dir(folder) and read_marker(folder) is None:
            if not (folder / "model_index.json").is_file():
                raise ConfigError(
                    f"model.create_tiny_random: {folder} already holds files that were not generated here (no {MARKER}); "
                    "choose a new folder for the tiny model"
                )
    if cfg.data.synthetic is not None:
        folder = _check_target("data.path", cfg.data.path, "synthetic data")
        if folder.is_dir() and not _is_empty_dir(folder) and read_marker(folder) is None:
            raise ConfigError(
                f"data.synthetic: data.path {folder} already holds files that were not generated here (no {MARKER}); "
                "point data.path at a new folder to generate synthetic videos there, or remove data.synthetic to "
                "train on what the folder holds"
            )


def create_missing_inputs(cfg: RecipeConfig) -> list[str]:
    """Create what the recipe asks for and is not there yet; returns a line per thing created (main process only)."""
    check_generated_inputs(cfg)
    created = []
    if cfg.model.create_tiny_random:
        line = _tiny_model(cfg)
        if line:
            created.append(line)
    if cfg.data.synthetic is not None:
        line = _synthetic_data(cfg)
        if line:
            created.append(line)
    return created


def _tiny_model(cfg: RecipeConfig) -> Optional[str]:
    from train.models import get_adapter

    folder = Path(cfg.model.pretrained).expanduser()
    spec = _tiny_model_spec(cfg)
    marker = read_marker(folder)
    complete = (folder / "model_index.json").is_file()
    if complete and (marker is None or marker == spec):
        return None  # ours and up to date, or a pipeline folder of the user's that is read, never written
    if marker is not None:  # ours, but another family/seed or incomplete: replace it
        shutil.rmtree(folder)
    get_adapter(cfg.model.family).save_tiny_random(str(folder), seed=cfg.train.seed)
    _write_marker(folder, spec)
    return f"tiny random {cfg.model.family} pipeline -> {folder}"


def _synthetic_data(cfg: RecipeConfig) -> Optional[str]:
    from data.synthetic import write_synthetic_dataset

    syn = cfg.data.synthetic
    assert syn is not None
    folder = Path(cfg.data.path).expanduser()
    spec = _synthetic_spec(cfg)
    if read_marker(folder) == {**spec, "complete": True} and (folder / "metadata.jsonl").is_file():
        return None
    folder.mkdir(parents=True, exist_ok=True)
    _write_marker(folder, spec)  # claim the folder first: an interrupted write is still known to be ours
    write_synthetic_dataset(folder, syn.num_videos, syn.frames, syn.height, syn.width, syn.fps, syn.seed)
    _write_marker(folder, {**spec, "complete": True})
    return f"{syn.num_videos} synthetic videos ({syn.frames} frames, {syn.height}x{syn.width}) -> {folder}"
