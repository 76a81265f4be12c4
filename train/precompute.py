"""Encode a recipe's dataset once: VAE latents + text embeddings into ``data.cache_dir``.

    accelerate launch [--num_processes N] train/precompute.py --config configs/<recipe>.yaml \
        [--shard-size 32] [--batch-size 1] [--dtype bfloat16] [--no-vae-tiling] [--overwrite] [section.key=value ...]

Every process encodes its share of the shards; a rerun after an interruption skips finished shards.
Training then reads the cache when ``data.cache_dir`` is set and its manifest matches the recipe.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional


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


def run(argv: Optional[list[str]] = None) -> None:
    """The command itself; errors propagate (``main`` turns user errors into one line)."""
    from train.config import ConfigError, load_config
    from train.latents import precompute

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


def main(argv: Optional[list[str]] = None) -> int:
    """``longvideo-precompute`` / ``python train/precompute.py``: exit code 0, or 2 with one ``error:`` line."""
    from train.cli import run_main

    return run_main(lambda: run(argv))


if __name__ == "__main__":
    if not __package__:  # run as a file: put the repository on sys.path (train/_as_script.py)
        import _as_script  # noqa: F401
    sys.exit(main())
