"""Generate a video with a (fine-tuned) video DiT and the same sparse attention it was trained with.

    python train/sample.py --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers --lora exports/my-run \
        --prompt "a red fox running through snow" --frames 321 --height 480 --width 832 \
        --attention radial --dense-steps 12 --dense-layers 1 --steps 50 --out video.mp4

The family comes from the pipeline's model_index.json (pass --family for a Hub id that is not cached offline).
Prints the time of every denoising step and the attention density of the sparse layers.
"""

from __future__ import annotations

import argparse
import sys


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, like every other user error
        self.exit(2, f"error: {message} (see --help)\n")


def parse_args(argv: list[str] | None = None):
    from train.attention.flags import add_attention_flags, attention_from_args, parse_bool
    from train.models import FAMILIES
    from train.sampling import SampleOptions

    p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="Hub id or local diffusers pipeline folder")
    p.add_argument("--prompt", required=True)
    p.add_argument("--out", default="video.mp4", help="output .mp4 (default video.mp4)")
    p.add_argument("--lora", default=None, help="LoRA export folder / Hub id / .safetensors")
    p.add_argument("--lora-scale", type=float, default=1.0)
    p.add_argument("--transformer", default=None, help="fine-tuned transformer (an export folder with transformer/)")
    p.add_argument("--family", default=None, help=f"{' | '.join(FAMILIES)} (default: from model_index.json)")
    p.add_argument("--revision", default=None)
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--fps", type=float, default=None, help="frame rate of the mp4 (default: the family's)")
    add_attention_flags(p)  # --attention, --block-size, --dense-layers, ... : one per AttentionConfig field
    p.add_argument("--dense-steps", type=int, default=0, help="first N denoising steps use dense attention")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance-scale", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default=None, help="bf16 | fp16 | fp32 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--vae-tiling", type=parse_bool, default=None, help="decode in tiles (default: on for CUDA)")
    p.add_argument("--cpu-offload", action="store_true", help="diffusers model CPU offload (big models, one GPU)")
    a = p.parse_args(argv)
    return SampleOptions(
        model=a.model, prompt=a.prompt, out=a.out, lora=a.lora, lora_scale=a.lora_scale, transformer=a.transformer,
        family=a.family, revision=a.revision, negative_prompt=a.negative_prompt, frames=a.frames, height=a.height,
        width=a.width, fps=a.fps, attention=attention_from_args(a), dense_steps=a.dense_steps,
        steps=a.steps, guidance_scale=a.guidance_scale, seed=a.seed, dtype=a.dtype, device=a.device,
        vae_tiling=a.vae_tiling, cpu_offload=a.cpu_offload,
    )


def run(argv: list[str] | None = None) -> None:
    """The command itself; errors propagate (``main`` turns user errors into one line)."""
    from train.sampling import generate

    generate(parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    """``longvideo-sample`` / ``python train/sample.py``: exit code 0, or 2 with one ``error:`` line."""
    from train.cli import run_main

    return run_main(lambda: run(argv))


if __name__ == "__main__":
    if not __package__:  # run as a file: put the repository on sys.path (train/_as_script.py)
        import _as_script  # noqa: F401
    sys.exit(main())
