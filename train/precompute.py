"""Encode a recipe's dataset once: VAE latents + text embeddings into ``data.cache_dir``.

    accelerate launch [--num_processes N] train/precompute.py --config configs/<recipe>.yaml \
        [--shard-size 32] [--batch-size 1] [--dtype bfloat16] [--no-vae-tiling] [--overwrite] [section.key=value ...]

Every process encodes its share of the shards; a rerun after an interruption skips finished shards.
Training then reads the cache when ``data.cache_dir`` is set and its manifest matches the recipe.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: make the packages importable

from train.cli import run_main  # noqa: E402


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="recipe YAML (configs/*.yaml); data.cache_dir must be set")
    parser.add_argument("--shard-size", type=int, default=32, help="clips per safetensors shard (the resume unit)")
    parser.add_argument("--batch-size", type=int, default=1, help="clips per VAE call")
    parser.add_argument("--dtype", default="bfloat16", help="storage dtype of latents and embeddings")
    parser.add_argument("--no-vae-tiling", action="store_true", help="encode whole frames (more memory, no tile seams)")
    parser.add_argument("--overwrite", action="store_true", help="replace a cache made for another setup")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. data.cache_dir=cache/latents")
    return parser.parse_args(argv)


def _model_dtype(precision: str, device: Any) -> Any:
    import torch

    if device.type != "cuda" or precision == "no":
        return torch.float32
    return torch.bfloat16 if precision == "bf16" else torch.float16


def _bound_vae_memory(encoders: Any) -> None:
    """Tiled (and sliced) VAE encoding keeps long 480p/720p clips within GPU memory."""
    vae = getattr(encoders, "vae", None)
    for name in ("enable_tiling", "enable_slicing"):
        if vae is not None and hasattr(vae, name):
            getattr(vae, name)()


def main(argv: Optional[list[str]] = None) -> None:
    from train.config import ConfigError, load_config

    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if not cfg.data.cache_dir:
        raise ConfigError("data.cache_dir is not set: name the folder the latent cache is written to")
    manifest = precompute(
        cfg,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        dtype=args.dtype,
        vae_tiling=not args.no_vae_tiling,
        overwrite=args.overwrite,
    )
    if manifest is not None:  # the recipe names this cache already (data.cache_dir is required here)
        print(f"train with the same recipe (data.cache_dir={cfg.data.cache_dir}) to use it")


def precompute(
    cfg: Any,
    *,
    shard_size: int = 32,
    batch_size: int = 1,
    dtype: str = "bfloat16",
    vae_tiling: bool = True,
    overwrite: bool = False,
    state: Any = None,
) -> Optional[Path]:
    """Encode ``cfg``'s dataset into ``cfg.data.cache_dir`` (every process its share); returns the manifest path.

    Also called by the trainer when a recipe names a cache folder that holds no cache yet.
    """
    from accelerate import PartialState

    from train.bootstrap import create_missing_inputs

    from train.bootstrap import check_generated_inputs
    from train.preflight import check_paths

    check_paths(cfg)
    check_generated_inputs(cfg)
    state = state or PartialState()
    if state.is_main_process:
        for line in create_missing_inputs(cfg):
            print(f"created {line}")
    state.wait_for_everyone()

    from data.cache import cache_identity, write_cache
    from data.dataset import build_dataset, validate_data_config
    from train.models import get_adapter

    model_dtype = _model_dtype(cfg.train.mixed_precision, state.device)
    adapter = get_adapter(cfg.model.family)(cfg.model.pretrained, cfg.model.revision, model_dtype)
    for frames, height, width in validate_data_config(cfg.data, adapter.frame_multiple):
        adapter.geometry(frames, height, width)  # every clip shape must suit the VAE: fail before encoding
    dataset, report = build_dataset(cfg.data, adapter.frame_multiple, cfg.train.seed)
    if state.is_main_process:
        print(report.summary())
    if len(dataset) == 0:
        raise ValueError(f"nothing to encode: every video was skipped ({report.total_skipped}); check data.path, data.frames, data.fps")
    encoders = adapter.load_encoders(state.device)
    if vae_tiling:
        _bound_vae_memory(encoders)
    identity = cache_identity(
        cfg.data, model_id=cfg.model.pretrained, revision=cfg.model.revision, family=cfg.model.family, dtype=dtype
    )
    start, done = time.perf_counter(), {"clips": 0}

    def progress(shard: int, clips_in_shard: int) -> None:
        done["clips"] += 1
        if state.is_main_process and done["clips"] % 10 == 0:
            rate = done["clips"] / (time.perf_counter() - start)
            print(f"rank 0: shard {shard}, {done['clips']} batches, {rate:.2f} batches/s", flush=True)

    manifest = write_cache(
        cfg.data.cache_dir,
        dataset,
        lambda pixels: adapter.encode_videos(encoders, pixels.to(state.device)),
        lambda prompts: adapter.encode_prompts(encoders, prompts),
        identity,
        shard_size=shard_size,
        batch_size=batch_size,
        rank=state.process_index,
        world_size=state.num_processes,
        num_workers=cfg.data.num_workers,
        barrier=state.wait_for_everyone if state.num_processes > 1 else None,
        overwrite=overwrite,
        extra_manifest={"skip_report": asdict(report), "frame_multiple": adapter.frame_multiple},
        on_batch=progress,
    )
    if manifest is not None:
        import json

        info = json.loads(manifest.read_text())
        elapsed = time.perf_counter() - start
        print(
            f"latent cache: {info['count']} clips in {cfg.data.cache_dir} ({len(info['failed'])} failed to decode) "
            f"in {elapsed:.1f}s"
        )
    return manifest


if __name__ == "__main__":
    sys.exit(run_main(main))
