"""Benchmark Sparse VideoGen2 attention (forward + backward) against dense SDPA and the radial mask.

Default: Wan2.1-1.3B at 480p (latent 30 x 52 = 1,560 tokens per frame) with 41 and 81 latent
frames (63,960 / 126,360 tokens), H=12, D=128, bf16, on one CUDA GPU.  For each length and
top_p it reports

- the time split of one SVG2 call with warm-started centroids (k-means, selection, layout =
  sort + range lists, permutation, attention, inverse permutation) and of its backward, from
  CUDA events; the share of everything that is not the attention kernel;
- the attention kernel's effective throughput (dense FLOPs x density / time) against dense
  SDPA measured in the same run;
- density, and the relative output error vs dense attention on structured inputs (planted,
  moving "objects" shared by q and k plus a smooth positional component), next to the radial
  mask tuned to the same density (when ``sparse_attn.radial`` / ``sparse_attn.block_sparse``
  are importable).

    python benchmarks/svg2.py --out docs/bench_svg2.md          # GPU
    python benchmarks/svg2.py --quick                           # CPU smoke run (tiny sizes)
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from sparse_attn.svg2 import (
    _plan, _resolve_backend, _svg2_forward, _tile_config, blocks_attention, permute_tokens, range_attention_torch,
)


# ----------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------
class StageTimer:
    """``with timer("name"):`` accumulates per-stage times (CUDA events on GPU, wall clock on CPU)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.pending: list[tuple[str, object, object]] = []
        self.totals: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        if self.cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            yield
            b.record()
            self.pending.append((name, a, b))
        else:
            t = time.perf_counter()
            yield
            self._add(name, (time.perf_counter() - t) * 1e3)

    def _add(self, name: str, ms: float) -> None:
        self.totals[name] = self.totals.get(name, 0.0) + ms
        self.counts[name] = self.counts.get(name, 0) + 1

    def flush(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            for name, a, b in self.pending:
                self._add(name, a.elapsed_time(b))
            self.pending.clear()

    def mean(self, name: str) -> float:
        self.flush()
        return self.totals.get(name, float("nan")) / max(1, self.counts.get(name, 0))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench(fn, device: torch.device, iters: int, warmup: int) -> float:
    """Mean milliseconds of ``fn()``."""
    for _ in range(warmup):
        fn()
    timer = StageTimer(device)
    for _ in range(iters):
        with timer("run"):
            fn()
    return timer.mean("run")


# ----------------------------------------------------------------------------------------------
# inputs with structure
# ----------------------------------------------------------------------------------------------
def structured_qkv(
    frames: int, lat_h: int, lat_w: int, heads: int, dim: int, *, objects: int, device, dtype, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v [1, H, N, D] (frame-major tokens) with semantic + positional structure.

    Each head sees ``objects`` moving blobs (Voronoi cells of drifting centres); q and k of a token
    are its object's prototype plus a random-Fourier embedding of its (t, y, x) position plus
    noise, so attention concentrates on the same object and, more weakly, on nearby tokens.
    """
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device)

    t = torch.linspace(0, 1, frames, device=device)
    y = torch.linspace(0, 1, lat_h, device=device)
    x = torch.linspace(0, 1, lat_w, device=device)
    tt, yy, xx = torch.meshgrid(t, y, x, indexing="ij")
    coords = torch.stack([tt, yy, xx], -1).reshape(-1, 3)  # [N, 3]
    n = coords.shape[0]
    c0 = torch.rand(heads, objects, 2, generator=g).to(device)
    vel = (torch.rand(heads, objects, 2, generator=g).to(device) - 0.5) * 0.6
    ids = torch.empty(heads, n, dtype=torch.long, device=device)
    hw = lat_h * lat_w
    for f in range(frames):
        cen = (c0 + vel * t[f]) % 1.0  # [H, O, 2]
        pts = coords[f * hw : (f + 1) * hw, 1:]  # [HW, 2]
        ids[:, f * hw : (f + 1) * hw] = torch.cdist(pts[None].expand(heads, -1, -1), cen).argmin(-1)
    a = math.sqrt(5.0 / math.sqrt(dim))  # same-object logit ~ 5
    b = math.sqrt(6.0 / math.sqrt(dim))  # same-position logit ~ 3
    freqs = rnd(3, dim // 2) * (2 * math.pi * 2.0)
    phase = coords @ freqs
    pos = torch.cat([phase.cos(), phase.sin()], -1)  # [N, D], |pos|^2 = D/2
    proto = rnd(heads, objects, dim)
    sem = torch.gather(proto, 1, ids[..., None].expand(heads, n, dim))
    out = []
    for _ in range(2):
        out.append((a * sem + b * pos[None] + 0.5 * rnd(heads, n, dim))[None].to(dtype))
    out.append(rnd(1, heads, n, dim).to(dtype))
    return out[0], out[1], out[2]


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.float() - ref.float()).norm() / ref.float().norm()).item()


# ----------------------------------------------------------------------------------------------
# radial comparison (teammates' modules; optional)
# ----------------------------------------------------------------------------------------------
def _radial_modules():
    try:
        from sparse_attn.block_sparse import block_sparse_attention
        from sparse_attn.radial import radial_block_mask
    except Exception as exc:  # noqa: BLE001 - report and go on without the comparison
        print(f"[svg2 bench] radial comparison skipped: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None
    return radial_block_mask, block_sparse_attention


def _token_density(block_mask: torch.Tensor, n: int, block: int) -> float:
    nb = block_mask.shape[-1]
    sizes = torch.full((nb,), block, dtype=torch.float64)
    sizes[-1] = n - block * (nb - 1)
    m = block_mask.reshape(-1, nb, nb).double().cpu()
    return float((sizes[:, None] * m * sizes[None, :]).sum((-1, -2)).mean() / n**2)


def radial_at_density(mods, frames, tpf, n, block, target, device):
    """Radial mask whose token density is closest to ``target`` (bisection on log decay_factor)."""
    radial_block_mask, _ = mods
    lo, hi = math.log(1e-3), math.log(1e3)
    best = None
    for _ in range(24):
        mid = 0.5 * (lo + hi)
        mask = radial_block_mask(frames, tpf, block_size=block, decay_factor=math.exp(mid), model="wan", device=device)
        d = _token_density(mask, n, block)
        if best is None or abs(d - target) < abs(best[1] - target):
            best = (mask, d, math.exp(mid))
        if d < target:
            lo = mid
        else:
            hi = mid
    return best


# ----------------------------------------------------------------------------------------------
# one configuration
# ----------------------------------------------------------------------------------------------
@dataclass
class Row:
    frames: int
    tokens: int
    top_p: float
    density: float = float("nan")
    stages: dict = field(default_factory=dict)
    fwd_ms: float = float("nan")
    bwd_ms: float = float("nan")
    attn_fwd_ms: float = float("nan")
    attn_bwd_ms: float = float("nan")
    dense_fwd_ms: float = float("nan")
    dense_fb_ms: float = float("nan")
    err: float = float("nan")
    radial_density: float = float("nan")
    radial_err: float = float("nan")
    radial_fb_ms: float = float("nan")
    kmeans_iters: tuple = ()


def run_config(args, frames: int, device: torch.device, dtype: torch.dtype, mods) -> list[Row]:
    lat_h, lat_w = args.latent_hw
    tpf = lat_h * lat_w
    n = frames * tpf
    h, d = args.heads, args.head_dim
    q, k, v = structured_qkv(frames, lat_h, lat_w, h, d, objects=args.objects, device=device, dtype=dtype,
                             seed=args.seed)
    # the "previous step" of the same layer: slightly different activations -> warm-start centroids
    q_prev = (q.float() + 0.1 * torch.randn_like(q, dtype=torch.float32)).to(dtype)
    k_prev = (k.float() + 0.1 * torch.randn_like(k, dtype=torch.float32)).to(dtype)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    go = torch.randn_like(q)
    flops_fwd = 4.0 * h * n * n * d

    with torch.no_grad():
        dense_out = F.scaled_dot_product_attention(q, k, v)

    def dense_fb():
        out = F.scaled_dot_product_attention(q, k, v)
        torch.autograd.grad(out, (q, k, v), go)

    def dense_f():
        with torch.no_grad():
            F.scaled_dot_product_attention(q, k, v)

    dense_fwd_ms = bench(dense_f, device, args.iters, args.warmup)
    dense_fb_ms = bench(dense_fb, device, args.iters, args.warmup)

    rows = []
    for top_p in args.top_p:
        row = Row(frames, n, top_p, dense_fwd_ms=dense_fwd_ms, dense_fb_ms=dense_fb_ms)
        cfg = dict(num_q_clusters=args.num_q_clusters, num_k_clusters=args.num_k_clusters, top_p=top_p,
                   min_kc_ratio=args.min_kc_ratio, kmeans_iters=None, text_tokens=0, key_padding_mask=None)
        with torch.no_grad():  # cold clustering on the previous step (not timed)
            _, prev_state = _svg2_forward(q_prev, k_prev, v, state=None, backend=args.backend, **cfg)

        timer = StageTimer(device)
        fb = StageTimer(device)
        for it in range(args.warmup + args.iters):
            t = timer if it >= args.warmup else StageTimer(device)
            f = fb if it >= args.warmup else StageTimer(device)
            with f("total"):
                with f("fwd"):
                    out, state = _svg2_forward(q, k, v, state=prev_state, backend=args.backend, stage=t, **cfg)
                with f("bwd"):
                    torch.autograd.grad(out, (q, k, v), go)
        row.stages = {s: timer.mean(s) for s in ("kmeans", "selection", "layout", "permute", "attention",
                                                 "inverse_permute")}
        row.fwd_ms, row.bwd_ms = fb.mean("fwd"), fb.mean("bwd")
        row.density = state.density
        row.kmeans_iters = state.kmeans_iterations
        row.err = rel_err(out.detach(), dense_out)

        # attention kernel alone, on the permuted tensors of this routing (the path the backend resolves to)
        resolved = _resolve_backend(args.backend, q)
        with torch.no_grad():
            plan = _plan(q, k, state=prev_state, tiles=None if resolved == "fa4" else _tile_config(q),
                         stage=lambda s: contextlib.nullcontext(), **{kk: vv for kk, vv in cfg.items()})
            qp = permute_tokens(q, plan.q_perm, plan.q_inv).detach().requires_grad_()
            kp = permute_tokens(k, plan.k_perm, plan.k_inv).detach().requires_grad_()
            vp = permute_tokens(v, plan.k_perm, plan.k_inv).detach().requires_grad_()
        if resolved == "fa4":
            def attn(a, b, c, p):
                return blocks_attention(a, b, c, p.blocks, backend="fa4")
        elif resolved == "triton":
            from sparse_attn.ops import range_attention

            def attn(a, b, c, p):
                return range_attention(a, b, c, p.layout)
        else:
            def attn(a, b, c, p):
                return range_attention_torch(a, b, c, p.layout)
        ka = StageTimer(device)
        for it in range(args.warmup + args.iters):
            a = ka if it >= args.warmup else StageTimer(device)
            with a("fwd"):
                op = attn(qp, kp, vp, plan)
            with a("bwd"):
                torch.autograd.grad(op, (qp, kp, vp), go)
        row.attn_fwd_ms, row.attn_bwd_ms = ka.mean("fwd"), ka.mean("bwd")
        del qp, kp, vp, op, plan

        if mods is not None:
            try:
                mask, rd, _ = radial_at_density(mods, frames, tpf, n, args.block_size, row.density, device)
                _, block_sparse_attention = mods
                with torch.no_grad():
                    r_out = block_sparse_attention(q, k, v, mask, block_size=args.block_size)
                row.radial_density, row.radial_err = rd, rel_err(r_out, dense_out)

                def radial_fb():
                    o = block_sparse_attention(q, k, v, mask, block_size=args.block_size)
                    torch.autograd.grad(o, (q, k, v), go)

                row.radial_fb_ms = bench(radial_fb, device, args.iters, args.warmup)
            except Exception as exc:  # noqa: BLE001 - keep the SVG2 numbers
                print(f"[svg2 bench] radial comparison failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        row_flops = flops_fwd * row.density
        row.stages["eff_tflops_fb"] = 3.5 * row_flops / (row.attn_fwd_ms + row.attn_bwd_ms) / 1e9
        row.stages["dense_tflops_fb"] = 3.5 * flops_fwd / dense_fb_ms / 1e9
        row.stages["eff_tflops_f"] = row_flops / row.attn_fwd_ms / 1e9
        row.stages["dense_tflops_f"] = flops_fwd / dense_fwd_ms / 1e9
        rows.append(row)
        print(f"[svg2 bench] frames={frames} top_p={top_p}: density={row.density:.3f} "
              f"fwd={row.fwd_ms:.1f}ms bwd={row.bwd_ms:.1f}ms err={row.err:.4f}", file=sys.stderr)
    return rows


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------
def _f(x: float, nd: int = 2) -> str:
    return "n/a" if x != x else f"{x:.{nd}f}"


def render(rows: list[Row], args, device: torch.device, dtype: torch.dtype) -> str:
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    try:
        import triton

        tv = triton.__version__
    except Exception:  # noqa: BLE001
        tv = "n/a"
    lines = [
        f"### SVG2 attention, forward + backward ({dev_name}; torch {torch.__version__}, triton {tv})",
        "",
        f"Shapes: B=1, H={args.heads}, D={args.head_dim}, {str(dtype).replace('torch.', '')}, latent "
        f"{args.latent_hw[0]}x{args.latent_hw[1]} tokens/frame; clusters Cq={args.num_q_clusters}, "
        f"Ck={args.num_k_clusters}, min_kc_ratio={args.min_kc_ratio}; k-means warm-started from the previous "
        f"step's centroids (default 2 iterations); backend={args.backend}; mean of {args.iters} runs after "
        f"{args.warmup} warm-up.  Times in ms.",
        "",
        "| frames | tokens | top_p | density | k-means | selection | layout | permute | attention fwd | "
        "inv. permute | SVG2 fwd | SVG2 bwd | attn-kernel bwd | non-attention share | dense fwd | dense fwd+bwd |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s = r.stages
        non_attn = (r.fwd_ms - s["attention"]) + (r.bwd_ms - r.attn_bwd_ms)
        share = 100.0 * non_attn / (r.fwd_ms + r.bwd_ms)
        lines.append(
            f"| {r.frames} | {r.tokens:,} | {r.top_p} | {_f(r.density, 3)} | {_f(s['kmeans'])} | "
            f"{_f(s['selection'])} | {_f(s['layout'])} | {_f(s['permute'])} | {_f(s['attention'])} | "
            f"{_f(s['inverse_permute'])} | {_f(r.fwd_ms)} | {_f(r.bwd_ms)} | {_f(r.attn_bwd_ms)} | "
            f"{_f(share, 1)}% | {_f(r.dense_fwd_ms)} | {_f(r.dense_fb_ms)} |"
        )
    lines += [
        "",
        "Attention-kernel effective throughput (dense FLOPs x density / kernel time; fwd+bwd counts 3.5x fwd) "
        "vs dense SDPA in the same run, and output error vs dense on structured inputs "
        "(relative Frobenius norm); radial = `radial_block_mask` with `decay_factor` chosen for the closest "
        "token density, run through `block_sparse_attention`.",
        "",
        "| frames | top_p | density | kernel TFLOP/s fwd | dense fwd | ratio | kernel TFLOP/s fwd+bwd | "
        "dense fwd+bwd | ratio | SVG2 rel. err | radial density | radial rel. err | radial fwd+bwd ms | "
        "k-means iters (q, k) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s = r.stages
        lines.append(
            f"| {r.frames} | {r.top_p} | {_f(r.density, 3)} | {_f(s['eff_tflops_f'], 1)} | "
            f"{_f(s['dense_tflops_f'], 1)} | {_f(s['eff_tflops_f'] / s['dense_tflops_f'])} | "
            f"{_f(s['eff_tflops_fb'], 1)} | {_f(s['dense_tflops_fb'], 1)} | "
            f"{_f(s['eff_tflops_fb'] / s['dense_tflops_fb'])} | {_f(r.err, 4)} | {_f(r.radial_density, 3)} | "
            f"{_f(r.radial_err, 4)} | {_f(r.radial_fb_ms)} | {r.kmeans_iters} |"
        )
    return "\n".join(lines) + "\n"


def _write_atomic(path: str, text: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".svg2_bench_", suffix=".md")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, nargs="+", default=[41, 81], help="latent frames")
    p.add_argument("--latent-hw", type=int, nargs=2, default=[30, 52], help="latent tokens per frame (h w)")
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--top-p", type=float, nargs="+", default=[0.9, 0.95])
    p.add_argument("--num-q-clusters", type=int, default=100)
    p.add_argument("--num-k-clusters", type=int, default=500)
    p.add_argument("--min-kc-ratio", type=float, default=0.1)
    p.add_argument("--objects", type=int, default=64, help="planted objects per head in the inputs")
    p.add_argument("--block-size", type=int, default=128, help="block size of the radial mask")
    p.add_argument("--backend", choices=["auto", "fa4", "triton", "torch"], default="auto")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--no-radial", action="store_true", help="skip the radial-mask comparison")
    p.add_argument("--out", default=None, help="write the markdown tables here (atomically)")
    p.add_argument("--quick", action="store_true", help="tiny CPU-sized smoke run")
    args = p.parse_args(argv)
    if args.quick:
        args.frames, args.latent_hw, args.heads, args.head_dim = [3], [8, 8], 2, 64
        args.num_q_clusters, args.num_k_clusters, args.objects, args.block_size = 8, 16, 6, 64
        args.iters, args.warmup = 1, 1
        if args.device is None:
            args.device = "cpu"
        if args.device == "cpu":
            args.dtype = "fp32"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    if device.type == "cpu" and dtype == torch.bfloat16:
        print("[svg2 bench] bf16 on CPU is not meaningful here; use --dtype fp32 or --quick", file=sys.stderr)
        return 2
    mods = None if args.no_radial else _radial_modules()
    rows: list[Row] = []
    for frames in args.frames:
        rows += run_config(args, frames, device, dtype, mods)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    text = render(rows, args, device, dtype)
    print(text)
    if args.out:
        _write_atomic(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
