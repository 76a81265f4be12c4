"""Fine-tune a video DiT on longer clips with sparse attention.

    accelerate launch [--config_file configs/accelerate/<setup>.yaml] train/finetune.py \
        --config configs/<recipe>.yaml [section.key=value ...]

A bad recipe or input stops with one ``error: ...`` line (exit code 2) before the run folder is touched; under a
bare ``accelerate launch`` the launcher adds its own CalledProcessError traceback, which ``accelerate launch -q``
hides.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="recipe YAML (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.max_steps=100")
    return parser.parse_args(argv)


def run(argv: list[str] | None = None) -> None:
    """The command itself; errors propagate (``main`` turns user errors into one line)."""
    from train.config import load_config

    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    from train.trainer import train  # heavy imports only once the recipe is known to be valid

    train(cfg)


def main(argv: list[str] | None = None) -> int:
    """``longvideo-finetune`` / ``python train/finetune.py``: exit code 0, or 2 with one ``error:`` line."""
    from train.cli import run_main

    return run_main(lambda: run(argv))


if __name__ == "__main__":
    if not __package__:  # run as a file: put the repository on sys.path (train/_as_script.py)
        import _as_script  # noqa: F401
    sys.exit(main())
