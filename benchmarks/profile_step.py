"""Where the time of one Wan2.1-1.3B LoRA training step goes (torch.profiler, CUDA kernel time by category).

    python benchmarks/profile_step.py --frames 321 --impl radial
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train_step import build, config_folder, step  # noqa: E402

CATEGORIES = [  # first match wins
    ("sparse attention fwd", r"_fwd_kernel|block_sparse_fwd|_attn_fwd"),
    ("sparse attention bwd", r"_bwd|bwd_kernel|_preprocess"),
    ("SDPA (text cross-attention)", r"flash|fmha|cudnn|attention|flex"),
    ("matmul (linear layers)", r"gemm|sm90|xmma|cutlass|nvjet|ampere|matmul"),
    ("rope / elementwise / norms / copies", r"elementwise|vectorized|reduce|norm|copy|cat|fill|index|softmax|mul|add"),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--frames", type=int, default=321)
    p.add_argument("--impl", default="radial")
    args = p.parse_args()
    device = torch.device("cuda")
    transformer, router, opt, params, latents, text, target, g = build(args.frames, args.impl, config_folder(), device)
    step(transformer, opt, params, latents, text, target)  # warm-up: kernels compiled, masks built
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step(transformer, opt, params, latents, text, target)
        torch.cuda.synchronize()
    totals: dict[str, float] = defaultdict(float)
    kernels: dict[str, float] = defaultdict(float)
    for evt in prof.key_averages():
        t = evt.self_device_time_total / 1e3  # ms
        if t <= 0:
            continue
        kernels[evt.key] += t
        cat = next((c for c, rx in CATEGORIES if re.search(rx, evt.key, re.I)), "other")
        totals[cat] += t
    whole = sum(totals.values())
    print(f"{torch.cuda.get_device_name()}: Wan2.1-1.3B LoRA step, {args.frames} frames ({g.video_tokens} tokens), {args.impl}; "
          f"GPU kernel time {whole / 1e3:.2f} s")
    print("\n| category | GPU ms | share |\n|---|---|---|")
    for cat, t in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"| {cat} | {t:.0f} | {100 * t / whole:.1f}% |")
    print("\n| top kernels | GPU ms |\n|---|---|")
    for name, t in sorted(kernels.items(), key=lambda kv: -kv[1])[:15]:
        print(f"| `{name[:90]}` | {t:.0f} |")


if __name__ == "__main__":
    main()
