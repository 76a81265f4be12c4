"""Where the time of one Wan2.1-1.3B LoRA training step goes, profiled inside the real Trainer
(torch.profiler, CUDA kernel time by category, plus how many attention forwards ran).

    python benchmarks/profile_step.py --frames 321 --impl radial --mode both
    python benchmarks/profile_step.py --frames 321 --impl radial --mode base    # full checkpointing, eager
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train_step  # noqa: E402

CATEGORIES = [  # first match wins
    ("sparse attention fwd", r"_fwd_kernel|block_sparse_fwd|_attn_fwd|flash_fwd|FlashAttentionForward"),
    ("sparse attention bwd", r"_bwd|bwd_kernel|_preprocess|FlashAttentionBackward"),
    ("SDPA (dense layer, text cross-attention)", r"flash|fmha|cudnn|attention|flex"),
    ("matmul (linear layers)", r"gemm|sm90|xmma|cutlass|nvjet|ampere|matmul"),
    ("compiled (Triton/inductor fused)", r"triton_|fused_"),
    ("rope / elementwise / norms / copies", r"elementwise|vectorized|reduce|norm|copy|cat|fill|index|softmax|mul|add"),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=321)
    p.add_argument("--impl", default="radial", choices=list(train_step.IMPLS))
    p.add_argument("--mode", default="both", choices=list(train_step.MODES))
    p.add_argument("--warmup", type=int, default=1)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("error: profile_step.py needs a CUDA device", file=sys.stderr)
        raise SystemExit(2)
    from train.config import load_config
    from train.trainer import Trainer

    spec = train_step.MODELS["wan-1.3b"]
    work = Path(tempfile.mkdtemp(prefix="profile-step-"))
    overrides, tokens = train_step.prepare(spec, "wan-1.3b", args.frames, work, torch.device("cuda"), tiny=False)
    policy, compile_ = train_step.MODES[args.mode]
    cfg = load_config(str(train_step.ROOT / spec.recipe), [
        *train_step.IMPLS[args.impl], *overrides, f"train.checkpoint_policy={policy}",
        f"train.compile={str(compile_).lower()}", f"train.output_dir={work / 'run'}",
        f"train.max_steps={args.warmup + 1}", "train.overwrite_output_dir=true",
    ])
    base = train_step.flex_trainer_class() if args.impl == "flex" else Trainer
    profiles: list = []

    class ProfiledTrainer(base):  # type: ignore[misc, valid-type]
        def _one_step(self, run):  # profile the step after the warm-up ones
            if run.pos.step < args.warmup:
                return super()._one_step(run)
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                                    torch.profiler.ProfilerActivity.CPU]) as prof:
                out = super()._one_step(run)
                torch.cuda.synchronize()
            profiles.append(prof)
            return out

    with train_step.dense_backends(torch.device("cuda")) if args.impl == "dense" else nullcontext():
        ProfiledTrainer(cfg).run()
    prof = profiles[-1]
    totals: dict[str, float] = defaultdict(float)
    kernels: dict[str, float] = defaultdict(float)
    launches: dict[str, int] = defaultdict(int)
    for evt in prof.key_averages():
        t = evt.self_device_time_total / 1e3  # ms
        if t <= 0:
            continue
        kernels[evt.key] += t
        cat = next((c for c, rx in CATEGORIES if re.search(rx, evt.key, re.I)), "other")
        totals[cat] += t
        launches[cat] += evt.count
    whole = sum(totals.values())
    print(f"{torch.cuda.get_device_name()}: Wan2.1-1.3B LoRA step through the Trainer, {args.frames} frames ({tokens} "
          f"tokens), {args.impl}, checkpointing {policy}, compile {'on' if compile_ else 'off'}; "
          f"GPU kernel time {whole / 1e3:.2f} s")
    print("\n| category | GPU ms | share |\n|---|---|---|")
    for cat, t in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"| {cat} | {t:.0f} | {100 * t / whole:.1f}% |")
    layers = train_step.MODELS["wan-1.3b"].layers
    print(f"\nsparse attention forward kernel launches: {launches['sparse attention fwd']} for {layers} blocks "
          f"({layers - cfg.attention.dense_layers} sparse; one launch each = no recomputed attention)")
    print("\n| top kernels | GPU ms |\n|---|---|")
    for name, t in sorted(kernels.items(), key=lambda kv: -kv[1])[:15]:
        print(f"| `{name[:90]}` | {t:.0f} |")


if __name__ == "__main__":
    main()
