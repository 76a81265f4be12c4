"""One LoRA training step of Wan2.1-T2V-1.3B at its real config (random weights) on a GPU.

Compares, in the same run and through the same diffusers attention processor:
  dense  - F.scaled_dot_product_attention (PyTorch picks flash / cuDNN / efficient),
  radial - our Triton block-sparse kernels with the official radial mask,
  flex   - torch.compile(flex_attention) with a BlockMask built from the very same radial block lists.
LoRA rank 128 on to_q/to_k/to_v/to_out.0, gradient checkpointing, bf16, batch 1, AdamW; median of the timed steps.

    python benchmarks/train_step.py --frames 81,161,321 --impls dense,radial,flex --out results.md
    torchrun --nproc_per_node 4 benchmarks/train_step.py --frames 321 --impls radial --sp 4   # Ulysses, 4 GPUs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WAN_1_3B = dict(  # Wan-AI/Wan2.1-T2V-1.3B-Diffusers transformer/config.json
    patch_size=[1, 2, 2], num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    eps=1e-6, image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=1024,
)


def config_folder() -> str:
    """A pipeline folder holding only configs, so the Wan adapter can compute geometry without weights."""
    root = Path(tempfile.mkdtemp(prefix="wan13b-config-"))
    (root / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline", "_diffusers_version": "0.42.1",
                                                      "transformer": ["diffusers", "WanTransformer3DModel"],
                                                      "vae": ["diffusers", "AutoencoderKLWan"]}))
    vae = {"_class_name": "AutoencoderKLWan", "z_dim": 16, "scale_factor_temporal": 4, "scale_factor_spatial": 8}
    for sub, cfg in (("transformer", {"_class_name": "WanTransformer3DModel", **WAN_1_3B}), ("vae", vae)):
        (root / sub).mkdir()
        (root / sub / "config.json").write_text(json.dumps(cfg))
    return str(root)


def use_flex(router) -> None:
    """Route the router's radial calls to FlexAttention with a BlockMask of the same blocks (the baseline)."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)
    cache: dict = {}

    def radial(self, q, k, v, text_tokens, key_padding_mask):
        mask, dens = self._mask_and_density(text_tokens, q.device)
        n = q.shape[2]
        key = (mask.data_ptr(), n)
        if key not in cache:
            counts = mask.sum(-1, dtype=torch.int32)
            order = torch.argsort((~mask).to(torch.uint8), dim=-1, stable=True).to(torch.int32)
            zeros = torch.zeros_like(counts)
            bs = self.cfg.block_size
            cache[key] = BlockMask.from_kv_blocks(zeros[None, None], order[None, None], counts[None, None],
                                                  order[None, None], BLOCK_SIZE=bs, seq_lengths=(n, n))
        self._current.sparse_calls += 1
        self._current.densities.append(dens)
        return compiled(q, k, v, block_mask=cache[key])

    router._radial = radial.__get__(router)


def build(frames: int, impl: str, folder: str, device: torch.device, sp=None):
    from peft import LoraConfig

    from diffusers import WanTransformer3DModel
    from train.config_schema import AttentionConfig
    from train.models import get_adapter

    adapter = get_adapter("wan")(folder, dtype=torch.bfloat16)
    geometry = adapter.geometry(frames, 480, 832)
    torch.manual_seed(0)
    with torch.device(device):  # random init directly on the GPU (a CPU init of 1.3B parameters takes long)
        transformer = WanTransformer3DModel.from_config(WAN_1_3B).to(torch.bfloat16)
    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=128, lora_alpha=128, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    for p in transformer.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    transformer.enable_gradient_checkpointing()
    attn = AttentionConfig(type="dense" if impl == "dense" else "radial", block_size=128, decay_factor=1.0, backend="triton")
    router = adapter.install_attention(transformer, attn, geometry)
    if impl == "flex":
        use_flex(router)
    if sp is not None:
        from train import sequence_parallel

        sequence_parallel.install("wan", transformer, sp)
        router.sequence_parallel = sp
    params = [p for p in transformer.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    g = geometry
    latents = torch.randn(1, 16, g.latent_frames, g.latent_height, g.latent_width, device=device)
    text = torch.randn(1, 512, 4096, device=device, dtype=torch.bfloat16)
    target = torch.randn_like(latents)
    return transformer, router, opt, params, latents, text, target, geometry


def step(transformer, opt, params, latents, text, target, scale: int = 1) -> float:
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = transformer(latents.to(torch.bfloat16), torch.tensor([500.0], device=latents.device), text, return_dict=False)[0]
    loss = torch.nn.functional.mse_loss(out.float(), target)
    (loss * scale).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss)


def run(frames: int, impl: str, folder: str, steps: int, sp=None) -> dict:
    device = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    transformer, router, opt, params, latents, text, target, g = build(frames, impl, folder, device, sp)
    times = []
    scale = sp.size if sp is not None else 1
    for i in range(steps + 1):  # the first step compiles kernels / builds masks
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step(transformer, opt, params, latents, text, target, scale)
        torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    result = {
        "frames": frames, "tokens": g.video_tokens, "impl": impl, "gpus": sp.size if sp is not None else 1,
        "step_s": statistics.median(times), "steps": times, "density": router.density(),
        "peak_gb": torch.cuda.max_memory_allocated() / 2**30,
    }
    del transformer, opt, params
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", default="81,161,321")
    p.add_argument("--impls", default="dense,radial,flex")
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    p.add_argument("--sp", type=int, default=1, help="Ulysses group size (launch with torchrun)")
    p.add_argument("--out", default=None, help="append the markdown table and JSON lines here")
    args = p.parse_args()

    sp = None
    if args.sp > 1:
        import torch.distributed as dist

        dist.init_process_group("nccl")
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        from train.sequence_parallel import SequenceParallel

        sp = SequenceParallel.create(args.sp)
    main_rank = sp is None or sp.rank == 0 and sp.dp_rank == 0
    folder = config_folder()
    rows = []
    for frames in [int(f) for f in args.frames.split(",")]:
        for impl in args.impls.split(","):
            try:
                r = run(frames, impl, folder, args.steps, sp)
            except torch.cuda.OutOfMemoryError:
                r = {"frames": frames, "impl": impl, "gpus": args.sp, "oom": True}
                torch.cuda.empty_cache()
            rows.append(r)
            if main_rank:
                print(json.dumps(r), flush=True)
    if not main_rank:
        return
    gpu = torch.cuda.get_device_name()
    lines = [f"GPU: {gpu} x{args.sp}; torch {torch.__version__}; {time.strftime('%Y-%m-%d')}", "",
             "| frames | tokens | GPUs | attention | density | step s (median) | peak GB | x dense | x flex |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("oom"):
            lines.append(f"| {r['frames']} | - | {r['gpus']} | {r['impl']} | - | OOM | - | - | - |")
            continue
        same = {x["impl"]: x for x in rows if x["frames"] == r["frames"] and not x.get("oom")}
        xd = f"{same['dense']['step_s'] / r['step_s']:.2f}" if "dense" in same else "-"
        xf = f"{same['flex']['step_s'] / r['step_s']:.2f}" if "flex" in same else "-"
        lines.append(f"| {r['frames']} | {r['tokens']} | {r['gpus']} | {r['impl']} | {r['density']:.3f} | "
                     f"{r['step_s']:.2f} | {r['peak_gb']:.1f} | {xd} | {xf} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(table + "\n\n")
            for r in rows:
                fh.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
