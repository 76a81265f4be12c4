"""Precompute throughput: the Wan2.1 VAE (real architecture, random weights) encoding 480p clips on a GPU.

    python benchmarks/vae_encode.py --frames 321 --height 480 --width 832 --clips 2
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--frames", type=int, default=321)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--clips", type=int, default=2)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--tiling", action="store_true", help="tiled encoding (bounded memory)")
    args = p.parse_args()
    from diffusers import AutoencoderKLWan

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    with torch.device("cuda"):
        vae = AutoencoderKLWan().to(dtype).eval()  # the default config is Wan2.1's VAE
    if args.tiling:
        vae.enable_tiling()
    x = torch.rand(1, 3, args.frames, args.height, args.width, device="cuda", dtype=dtype) * 2 - 1
    times = []
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        for i in range(args.clips + 1):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            z = vae.encode(x).latent_dist.mode()
            torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - t0)
    s = sorted(times)[len(times) // 2]
    print(f"| {torch.cuda.get_device_name()} | {args.frames}x{args.height}x{args.width} | {args.dtype} | "
          f"tiling {'on' if args.tiling else 'off'} | {tuple(z.shape)} | {s:.2f} s/clip | {1 / s:.3f} clips/s | "
          f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GB |")


if __name__ == "__main__":
    main()
