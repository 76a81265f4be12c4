#!/usr/bin/env python
"""Block-sparse attention on a GPU: ours vs dense SDPA (cuDNN, flash) vs FlexAttention on the same mask.

Everything is measured in one process on one card, so the baselines are same-run numbers.  Three parts,
each optional:

* ``--check``  correctness in bf16/fp16/fp32 at realistic sizes against an fp32 oracle (our torch path)
  and, on a slice of query rows, against ``F.scaled_dot_product_attention`` with the mask expanded;
* ``--sweep``  tile/warp/stage/TMA/schedule variants of each kernel, timed separately (tuning);
* ``--table``  the benchmark table of issue 3: forward and forward+backward, bf16, B=1, D=128 on the
  radial masks of Wan2.1 (21/41/81 x 1560 tokens, H=12) and HunyuanVideo (33/65 x 3600, H=24).

Effective TFLOP/s = density * 4 * B * H * N^2 * D / time (x3.5 for forward+backward); dense baselines use
density 1.  Times are medians (``triton.testing.do_bench``; ops slower than 300 ms: median of 3 event
timed runs).  Writes ``results.jsonl`` and ``table.md`` under ``--out``.

Example: ``python benchmarks/attention.py --check --table --shapes wan41,wan81 --out /tmp/bench``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime, timezone

import torch
import torch.nn.functional as F

SHAPES = {
    "wan21": dict(frames=21, tpf=1560, heads=12, model="wan"),
    "wan41": dict(frames=41, tpf=1560, heads=12, model="wan"),
    "wan81": dict(frames=81, tpf=1560, heads=12, model="wan"),
    "hy33": dict(frames=33, tpf=3600, heads=24, model="hunyuan"),
    "hy65": dict(frames=65, tpf=3600, heads=24, model="hunyuan"),
}
HEAD_DIM = 128
BLOCK = 128

_records: list[dict] = []
_out_dir = "."


def log(rec: dict) -> None:
    _records.append(rec)
    with open(os.path.join(_out_dir, "results.jsonl"), "a") as f:
        f.write(json.dumps(rec) + "\n")
    print(json.dumps(rec), flush=True)


# ------------------------------------------------------------------------------------------------ timing


def bench_ms(fn, grad_to_none=None) -> float:
    """Median milliseconds of ``fn``; slow ops get three event-timed runs instead of do_bench's many."""
    import triton

    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    est = start.elapsed_time(end)
    if est > 300:
        times = []
        for _ in range(3):
            if grad_to_none:
                for t in grad_to_none:
                    t.grad = None
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return sorted(times)[1]
    return triton.testing.do_bench(fn, warmup=25, rep=max(100, int(8 * est)), grad_to_none=grad_to_none, return_mode="median")


def peak_gb(fn) -> float:
    """Peak memory allocated during ``fn`` beyond what was allocated before, in GB."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 1e9


# ------------------------------------------------------------------------------------------------ masks


def radial_mask(shape: dict, device) -> tuple[torch.Tensor, int, float]:
    """(mask, N, build ms).  Uses sparse_attn.radial; the build is timed uncached but warm (a first
    build in the process pays CUDA start-up costs that have nothing to do with the mask)."""
    from sparse_attn import radial

    n = shape["frames"] * shape["tpf"]
    args = (shape["frames"], shape["tpf"])
    kwargs = dict(block_size=BLOCK, model=shape["model"], device=device)
    radial.radial_block_mask(*args, **kwargs)
    if hasattr(radial, "_cached_mask"):
        radial._cached_mask.cache_clear()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    mask = radial.radial_block_mask(*args, **kwargs)
    torch.cuda.synchronize()
    return mask, n, (time.perf_counter() - t0) * 1e3


def index_build_ms(mask: torch.Tensor) -> float:
    from sparse_attn.indices import block_index

    times = []
    for _ in range(5):
        m = mask.clone()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        idx = block_index(m)
        idx.schedule(1, 1, transposed=False)
        idx.schedule(1, 1, transposed=True)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[2]


def flex_block_mask(mask: torch.Tensor, n: int):
    """FlexAttention BlockMask with exactly our kept blocks, all marked 'full' (no mask_mod work)."""
    from torch.nn.attention.flex_attention import BlockMask

    counts = mask.sum(-1, dtype=torch.int32)
    order = torch.argsort((~mask).to(torch.uint8), dim=-1, stable=True).to(torch.int32)
    zeros = torch.zeros_like(counts)
    return BlockMask.from_kv_blocks(
        zeros[None, None], order[None, None], counts[None, None], order[None, None], BLOCK_SIZE=BLOCK, seq_lengths=(n, n)
    )


# ------------------------------------------------------------------------------------------------ inputs


def make_qkv(b, h, n, d, dtype, device, layout="bhnd", requires_grad=True):
    def one():
        if layout == "bnhd":  # the layout diffusers produces: [B, N, H, D] viewed as [B, H, N, D]
            x = torch.randn(b, n, h, d, dtype=dtype, device=device).transpose(1, 2)
        else:
            x = torch.randn(b, h, n, d, dtype=dtype, device=device)
        return x.requires_grad_(requires_grad)

    return one(), one(), one()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# ------------------------------------------------------------------------------------------------ check


def run_check(device) -> bool:
    from sparse_attn.block_sparse import block_sparse_attention
    from sparse_attn.indices import block_index
    from sparse_attn.kernels.block_sparse import KernelConfig, block_sparse_backward, block_sparse_forward
    from sparse_attn.radial import radial_block_mask

    torch.manual_seed(0)
    ok_all = True
    tol = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 1e-4}

    def random_mask(shape, p):
        m = torch.rand(shape, device=device) < p
        return m

    cases = []
    m = radial_block_mask(10, 1560, block_size=128, model="wan", device=device)
    cases.append(("bf16 radial wan10 D128 bs128 bnhd", 1, 4, 15600, 128, 128, torch.bfloat16, m, None, "bnhd"))
    m = random_mask((3, 79, 79), 0.3)
    m[1, 5] = False
    kpm = torch.rand(2, 5000, device=device) < 0.9
    kpm[1, 4000:] = False
    cases.append(("fp16 perhead D64 bs64 kpm emptyrow", 2, 3, 5000, 64, 64, torch.float16, m, kpm, "bhnd"))
    m = random_mask((2, 1, 64, 64), 0.25)
    kpm = torch.ones(2, 8192, dtype=torch.bool, device=device)
    kpm[0, -300:] = False
    cases.append(("bf16 [B,1] mask D128 bs128 even kpm", 2, 2, 8192, 128, 128, torch.bfloat16, m, kpm, "bhnd"))
    m = random_mask((24, 24), 0.5)
    cases.append(("fp32 D128 bs128", 1, 2, 3000, 128, 128, torch.float32, m, None, "bhnd"))
    m = random_mask((40, 40), 0.4)
    cases.append(("bf16 D64 bs128 tail", 1, 3, 5050, 64, 128, torch.bfloat16, m, None, "bhnd"))

    for name, b, h, n, d, bs, dtype, mask, kpm, layout in cases:
        q, k, v = make_qkv(b, h, n, d, dtype, device, layout)
        do = torch.randn(b, h, n, d, dtype=dtype, device=device)
        out = block_sparse_attention(q, k, v, mask, block_size=bs, key_padding_mask=kpm)
        out.backward(do)
        grads = [q.grad, k.grad, v.grad]
        q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
        ref = block_sparse_attention(q32, k32, v32, mask, block_size=bs, key_padding_mask=kpm, backend="torch")
        ref.backward(do.float())
        errs = dict(o=rel(out, ref), dq=rel(grads[0], q32.grad), dk=rel(grads[1], k32.grad), dv=rel(grads[2], v32.grad))
        nan = any(bool(torch.isnan(t).any()) for t in [out, *grads])
        # independent oracle on a slice of query rows: dense SDPA with the block mask expanded to tokens
        r0, r1 = max(0, n - 1200), n
        nb = mask.shape[-1]
        m4 = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape)).expand(b, h, nb, nb)
        rows = torch.arange(r0, r1, device=device) // bs
        tok = m4[:, :, rows].repeat_interleave(bs, dim=-1)[..., :n]
        if kpm is not None:
            tok = tok & kpm[:, None, None, :]
        has_key = tok.any(-1, keepdim=True)
        sdpa = F.scaled_dot_product_attention(q32[:, :, r0:r1].detach(), k32.detach(), v32.detach(), attn_mask=tok | ~has_key)
        sdpa = torch.where(has_key, sdpa, torch.zeros_like(sdpa))
        errs["o_sdpa_slice"] = rel(out[:, :, r0:r1], sdpa)
        good = (not nan) and all(e < tol[dtype] for e in errs.values())
        ok_all &= good
        log(dict(part="check", case=name, nan=nan, ok=good, **{k_: round(v_, 7) for k_, v_ in errs.items()}))

        # alternative kernel configs (TMA, other tiles) through the launchers, same oracle
        if dtype != torch.float32:
            idx = block_index(mask)
            C = KernelConfig
            if bs == 128:
                variants = [
                    (C(128, 64, 8, 3, tma=True), C(64, 128, 8, 2, tma=True), C(128, 64, 8, 2, tma=True)),
                    (C(128, 64, 8, 3), C(32, 128, 8, 3), C(128, 32, 8, 3)),
                ]
            else:
                variants = [(C(64, 64, 4, 3, tma=True), C(32, 64, 4, 3, tma=True), C(64, 32, 4, 3, tma=True))]
            for cf, ck, cq in variants:
                try:
                    qq, kk, vv = q.detach(), k.detach(), v.detach()
                    sr = idx.schedule(b, h, transposed=False)
                    sc = idx.schedule(b, h, transposed=True)
                    o2, lse = block_sparse_forward(qq, kk, vv, idx, sr, block_size=bs, scale=d ** -0.5, key_padding_mask=kpm, config=cf)
                    dq2, dk2, dv2 = block_sparse_backward(
                        do, qq, kk, vv, o2, lse, idx, sr, sc, block_size=bs, scale=d ** -0.5, key_padding_mask=kpm,
                        dkdv_config=ck, dq_config=cq,
                    )
                    e2 = dict(o=rel(o2, ref), dq=rel(dq2, q32.grad), dk=rel(dk2, k32.grad), dv=rel(dv2, v32.grad))
                    good2 = all(e < tol[dtype] for e in e2.values())
                    ok_all &= good2
                    log(dict(part="check", case=f"{name} | {cf} | {ck} | {cq}", ok=good2,
                             **{k_: round(v_, 7) for k_, v_ in e2.items()}))
                except Exception as exc:  # report and go on: a failing variant must not hide the others
                    ok_all = False
                    log(dict(part="check", case=name + " variant", ok=False, error=f"{type(exc).__name__}: {str(exc)[:300]}"))
        del q, k, v, do, out, grads, q32, k32, v32, ref
        torch.cuda.empty_cache()
    return ok_all


# ------------------------------------------------------------------------------------------------ sweep


def run_sweep(shape_names, device) -> None:
    """Time kernel variants on the radial mask; each variant's result is compared with the default's."""
    from sparse_attn.indices import block_index
    from sparse_attn.kernels.block_sparse import KernelConfig as C
    from sparse_attn.kernels.block_sparse import block_sparse_backward, block_sparse_forward, default_configs

    # The variants tried so far (H200, Wan 81 x 1560, results in docs/benchmarks.md).  Atomic dQ inside the
    # dK/dV pass and tl.range(warp_specialize=True) in the forward were tried too and removed (slower / no
    # effect).
    fwd_cfgs = [C(128, 128, 8, 3), C(128, 128, 8, 2), C(128, 64, 8, 3), C(128, 64, 8, 4), C(128, 128, 8, 2, tma=True), C(128, 64, 4, 3)]
    # (dK/dV config, dQ config)
    bwd_cfgs = [
        (C(64, 64, 4, 3), C(128, 64, 8, 2)),
        (C(64, 128, 8, 2), C(128, 64, 8, 2)),
        (C(64, 128, 8, 2, tma=True), C(128, 64, 8, 2, tma=True)),
        (C(32, 128, 8, 3), C(128, 32, 8, 3)),
        (C(64, 64, 4, 3), C(64, 64, 4, 3)),
    ]
    for sname in shape_names:
        shape = SHAPES[sname]
        mask, n, _ = radial_mask(shape, device)
        density = mask.float().mean().item()
        h = shape["heads"]
        q, k, v = make_qkv(1, h, n, HEAD_DIM, torch.bfloat16, device, requires_grad=False)
        do = torch.randn_like(q)
        idx = block_index(mask)
        scale = HEAD_DIM ** -0.5
        flops = density * 4 * h * n * n * HEAD_DIM
        defaults = default_configs(HEAD_DIM, torch.bfloat16, BLOCK)
        sr = idx.schedule(1, h, transposed=False)
        sc = idx.schedule(1, h, transposed=True)
        o_ref, lse = block_sparse_forward(q, k, v, idx, sr, block_size=BLOCK, scale=scale, config=defaults["fwd"])
        g_ref = block_sparse_backward(do, q, k, v, o_ref, lse, idx, sr, sc, block_size=BLOCK, scale=scale,
                                      dkdv_config=defaults["dkdv"], dq_config=defaults["dq"])

        def tm(label, fn, flop_mult, check):
            try:
                res = fn()
                diffs = [round(rel(a, b), 5) for a, b in check(res)]
                ms = bench_ms(fn)
                log(dict(part="sweep", shape=sname, kernel=label, ms=round(ms, 3),
                         eff_tflops=round(flop_mult * flops / ms / 1e9, 1), rel_vs_default=diffs))
            except Exception as exc:
                log(dict(part="sweep", shape=sname, kernel=label, error=f"{type(exc).__name__}: {str(exc)[:300]}"))

        for c in fwd_cfgs:
            tm(f"fwd {c}", lambda c=c: block_sparse_forward(q, k, v, idx, sr, block_size=BLOCK, scale=scale, config=c),
               1.0, lambda r: [(r[0], o_ref)])
        for ck, cq in bwd_cfgs:
            tm(f"bwd {ck} + {cq}", lambda ck=ck, cq=cq: block_sparse_backward(
                do, q, k, v, o_ref, lse, idx, sr, sc, block_size=BLOCK, scale=scale, dkdv_config=ck, dq_config=cq),
               2.5, lambda r: list(zip(r, g_ref)))
        for mode in ("natural",):
            srn = idx.schedule(1, h, transposed=False, mode=mode)
            scn = idx.schedule(1, h, transposed=True, mode=mode)
            tm(f"fwd default, schedule {mode}", lambda: block_sparse_forward(q, k, v, idx, srn, block_size=BLOCK, scale=scale),
               1.0, lambda r: [(r[0], o_ref)])
            tm(f"bwd default, schedule {mode}", lambda: block_sparse_backward(do, q, k, v, o_ref, lse, idx, srn, scn, block_size=BLOCK, scale=scale),
               2.5, lambda r: list(zip(r, g_ref)))
        del q, k, v, do, o_ref, g_ref
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ table


def run_table(shape_names, device, baselines) -> list[dict]:
    from sparse_attn.block_sparse import block_sparse_attention
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rows = []
    flex = None
    if "flex" in baselines:
        from torch.nn.attention.flex_attention import flex_attention

        torch._dynamo.config.cache_size_limit = 64
        flex = torch.compile(flex_attention, dynamic=False)
    for sname in shape_names:
        shape = SHAPES[sname]
        mask, n, mask_ms = radial_mask(shape, device)
        density = mask.float().mean().item()
        h = shape["heads"]
        idx_ms = index_build_ms(mask)
        q, k, v = make_qkv(1, h, n, HEAD_DIM, torch.bfloat16, device)
        do = torch.randn_like(q)
        dense_flops = 4 * h * n * n * HEAD_DIM
        impls = {"ours": (lambda: block_sparse_attention(q, k, v, mask, block_size=BLOCK), density)}
        if "cudnn" in baselines:
            def cudnn():
                with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                    return F.scaled_dot_product_attention(q, k, v)
            impls["sdpa-cudnn"] = (cudnn, 1.0)
        if "flash" in baselines:
            def flash():
                with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                    return F.scaled_dot_product_attention(q, k, v)
            impls["sdpa-flash"] = (flash, 1.0)
        if flex is not None:
            bm = flex_block_mask(mask, n)
            impls["flex"] = (lambda: flex(q, k, v, block_mask=bm), density)
        ref_out = None
        for name, (fn, dens) in impls.items():
            rec = dict(part="table", shape=sname, impl=name, n=n, heads=h, density=round(density, 4))
            try:
                with torch.no_grad():
                    out = fn()
                if name == "ours":
                    ref_out = out
                    rec["mask_build_ms"] = round(mask_ms, 2)
                    rec["index_build_ms"] = round(idx_ms, 2)
                elif name == "flex" and ref_out is not None:
                    rec["rel_vs_ours"] = round(rel(out, ref_out), 5)
                del out
                with torch.no_grad():
                    rec["fwd_ms"] = round(bench_ms(fn), 3)

                def step():
                    fn().backward(do)

                rec["fwdbwd_ms"] = round(bench_ms(step, grad_to_none=[q, k, v]), 3)
                q.grad = k.grad = v.grad = None
                rec["peak_fwdbwd_gb"] = round(peak_gb(step), 3)
                q.grad = k.grad = v.grad = None
                rec["fwd_tflops"] = round(dens * dense_flops / rec["fwd_ms"] / 1e9, 1)
                rec["fwdbwd_tflops"] = round(3.5 * dens * dense_flops / rec["fwdbwd_ms"] / 1e9, 1)
            except Exception as exc:
                rec["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            log(rec)
            rows.append(rec)
        del q, k, v, do, ref_out
        torch.cuda.empty_cache()
    return rows


def markdown(rows: list[dict]) -> str:
    by_shape: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_shape.setdefault(r["shape"], {})[r["impl"]] = r
    lines = [
        "| shape | N | H | density | impl | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | x dense (cuDNN) | x Flex | peak GB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for sname, impls in by_shape.items():
        dense = impls.get("sdpa-cudnn", {})
        flex = impls.get("flex", {})
        for name, r in impls.items():
            if "error" in r:
                lines.append(f"| {sname} | {r['n']} | {r['heads']} | {r['density']:.3f} | {name} | error: {r['error'][:60]} |||||||")
                continue
            sd = f"{dense['fwdbwd_ms'] / r['fwdbwd_ms']:.2f}" if "fwdbwd_ms" in dense else "-"
            sf = f"{flex['fwdbwd_ms'] / r['fwdbwd_ms']:.2f}" if "fwdbwd_ms" in flex else "-"
            lines.append(
                f"| {sname} | {r['n']} | {r['heads']} | {r['density']:.3f} | {name} | {r['fwd_ms']:.1f} | {r['fwd_tflops']:.0f} | "
                f"{r['fwdbwd_ms']:.1f} | {r['fwdbwd_tflops']:.0f} | {sd} | {sf} | {r['peak_fwdbwd_gb']:.2f} |"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    global _out_dir
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="correctness checks first")
    p.add_argument("--sweep", action="store_true", help="kernel config sweep (tuning)")
    p.add_argument("--table", action="store_true", help="benchmark table")
    p.add_argument("--shapes", default="wan21,wan41,wan81,hy33,hy65", help="table shapes: " + ",".join(SHAPES))
    p.add_argument("--sweep-shapes", default="wan81")
    p.add_argument("--baselines", default="cudnn,flash,flex")
    p.add_argument("--out", default=".")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    _out_dir = args.out
    os.makedirs(_out_dir, exist_ok=True)
    device = torch.device("cuda")
    import triton

    log(dict(part="env", gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
             date=datetime.now(timezone.utc).isoformat(timespec="seconds"), argv=sys.argv))
    status = 0
    if args.check and not run_check(device):
        status = 1
    if args.sweep:
        run_sweep([s for s in args.sweep_shapes.split(",") if s], device)
    if args.table:
        rows = run_table([s for s in args.shapes.split(",") if s], device, set(args.baselines.split(",")))
        md = markdown(rows)
        with open(os.path.join(_out_dir, "table.md"), "w") as f:
            f.write(md + "\n")
        print(md)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
