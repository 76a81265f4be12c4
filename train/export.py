"""Export a training run for diffusers, ComfyUI and the Hugging Face Hub.

    python train/export.py --checkpoint runs/my-run --output exports/my-run \
        [--merge] [--lora-format diffusers,comfyui] [--dtype bf16|fp16|fp32] \
        [--push-to-hub user/my-lora [--private]] [--force]

--checkpoint takes a run folder (its final/ weights, else the newest checkpoint) or one checkpoint folder.
Writes pytorch_lora_weights.safetensors (diffusers), lora_comfyui.safetensors (ComfyUI), with --merge or for
a full fine-tune transformer/ (diffusers layout), a model card README.md and the training config.
"""

from __future__ import annotations

import argparse
import sys


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, like every other user error
        self.exit(2, f"error: {message} (see --help)\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run folder or checkpoint folder")
    p.add_argument("--output", required=True, help="export folder (refused when non-empty, unless --force)")
    p.add_argument("--merge", action="store_true", help="also write the base transformer with the LoRA merged (transformer/)")
    p.add_argument("--lora-format", default=None,
                   help="comma-separated: diffusers, comfyui, or none (default: diffusers + comfyui where the family has original names)")
    p.add_argument("--dtype", default="bf16", help="bf16 | fp16 | fp32 (default bf16)")
    p.add_argument("--push-to-hub", metavar="REPO_ID", default=None, help="upload the folder to this Hub model repo")
    p.add_argument("--private", action="store_true", help="create the Hub repo as private")
    p.add_argument("--max-shard-size", default="5GB", help="shard size of transformer/ (default 5GB)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --output")
    args = p.parse_args(argv)
    if args.private and not args.push_to_hub:
        p.error("--private needs --push-to-hub")
    return args


def run(argv: list[str] | None = None) -> None:
    """The command itself; errors propagate (``main`` turns user errors into one line)."""
    from train.exporting import export_checkpoint

    args = parse_args(argv)
    export_checkpoint(
        args.checkpoint,
        args.output,
        merge=args.merge,
        lora_formats=args.lora_format,
        dtype=args.dtype,
        force=args.force,
        push_to_hub=args.push_to_hub,
        private=args.private,
        max_shard_size=args.max_shard_size,
    )


def main(argv: list[str] | None = None) -> int:
    """``longvideo-export`` / ``python train/export.py``: exit code 0, or 2 with one ``error:`` line."""
    from train.cli import run_main

    return run_main(lambda: run(argv))


if __name__ == "__main__":
    if not __package__:  # run as a file: put the repository on sys.path (train/_as_script.py)
        import _as_script  # noqa: F401
    sys.exit(main())
