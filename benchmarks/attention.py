#!/usr/bin/env python
"""Block-sparse attention on a GPU: ours vs dense SDPA (cuDNN, flash) vs FlexAttention on the same mask.

Everything is measured in one process on one card, so the baselines are same-run numbers.  Three parts,
each optional:

* ``--check``  correctness in bf16/fp16/fp32 at realistic sizes against an fp32 oracle (our torch path)
  and, on a slice of query rows, against ``F.scaled_dot_product_attention`` with the mask expanded;
* ``--sweep``  tile/warp/stage/TMA/schedule variants of each kernel, timed separately (tuning);
* ``--table``  the benchmark table: forward and forward+backward, bf16, B=1, D=128 on the radial masks of
  Wan2.1 (21/41/81 x 1560 tokens, H=12) and HunyuanVideo (33/65 x 3600, H=24); columns (``--impls``): dense
  cuDNN SDPA, dense FlashAttention-4, FlexAttention, ours with ``backend="triton"``, ours with ``backend="auto"``
  (FA4 through ``sparse_attn`` where installed) and FA4 block-sparse called directly (the call sequence of
  ../shared/notes/kernels.md section 7: what ``auto`` should match);
* ``--svg2``   SVG2 layouts (Wan 41/81, top_p 0.9, structured inputs): the attention on the permuted sequence with
  our Triton range kernel vs the 128-block form on FA4, and the routing time (warm k-means, selection, blocks).

q, k, v are stored ``[B, N, H, D]`` (as diffusers' processors hold them) and passed as ``[B, H, N, D]`` views.
``--quick`` times forward+backward only, with fewer repetitions (the ~5-minute run of every column).

Effective TFLOP/s = density * 4 * B * H * N^2 * D / time (x3.5 for forward+backward); dense baselines use
density 1.  Times are medians (``triton.testing.do_bench``; ops slower than 300 ms: median of 3 event
timed runs).  Writes ``results.jsonl`` and ``table.md`` under ``--out``.

Example: ``python benchmarks/attention.py --check --table --shapes wan41,wan81 --out /tmp/bench``
All columns in about 5 minutes of an H200:
``python benchmarks/attention.py --table --svg2 --quick --shapes wan41,wan81,hy33,hy65 --out /tmp/bench``
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


_QUICK = False


def bench_ms(fn, grad_to_none=None) -> float:
    """Median milliseconds of ``fn``; slow ops get three event-timed runs instead of do_bench's many
    (``--quick``: the faster of two, and do_bench over at most ~0.5 s)."""
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
        for _ in range(2 if _QUICK else 3):
            if grad_to_none:
                for t in grad_to_none:
                    t.grad = None
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return min(times) if _QUICK else sorted(times)[1]
    rep = min(500, max(100, int(4 * est))) if _QUICK else max(100, int(8 * est))
    return triton.testing.do_bench(fn, warmup=10 if _QUICK else 25, rep=rep, grad_to_none=grad_to_none, return_mode="median")


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


def _fa4_direct():
    """FA4's public autograd entry points, or None when flash-attn-4 is not importable."""
    try:
        from flash_attn.cute import flash_attn_func
        from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch
    except Exception as exc:  # noqa: BLE001
        log(dict(part="env", fa4=f"not importable: {type(exc).__name__}: {str(exc)[:200]}"))
        return None
    return flash_attn_func, BlockSparseTensorsTorch


def fa4_lists(mask: torch.Tensor, bst_cls):
    """(forward, backward) FA4 block tensors with every kept block 'full' and an empty partial list (notes section 7)."""
    def lists(m):
        cnt = m.sum(-1, dtype=torch.int32)
        idx = torch.sort(torch.where(m, torch.arange(m.shape[-1], device=m.device), m.shape[-1]), -1).values
        idx = torch.where(idx == m.shape[-1], 0, idx).to(torch.int32)
        return cnt[None, None].contiguous(), idx[None, None].contiguous()

    fc, fi = lists(mask)
    bc, bi = lists(mask.T)
    zc, zi = torch.zeros_like(fc), torch.zeros_like(fi[..., :1])
    zbc, zbi = torch.zeros_like(bc), torch.zeros_like(bi[..., :1])
    return (bst_cls(zc, zi, fc, fi, block_size=(BLOCK, BLOCK)), bst_cls(zbc, zbi, bc, bi, block_size=(BLOCK, BLOCK)))


def _timed_row(rec: dict, fn, dens: float, dense_flops: float, do, leaves) -> None:
    """Fill ``rec`` with fwd (unless --quick) and fwd+bwd times, throughput and peak memory."""
    if not _QUICK:
        with torch.no_grad():
            rec["fwd_ms"] = round(bench_ms(fn), 3)
        rec["fwd_tflops"] = round(dens * dense_flops / rec["fwd_ms"] / 1e9, 1)

    def step():
        fn().backward(do)

    rec["fwdbwd_ms"] = round(bench_ms(step, grad_to_none=list(leaves)), 3)
    for t in leaves:
        t.grad = None
    if not _QUICK:
        rec["peak_fwdbwd_gb"] = round(peak_gb(step), 3)
        for t in leaves:
            t.grad = None
    rec["fwdbwd_tflops"] = round(3.5 * dens * dense_flops / rec["fwdbwd_ms"] / 1e9, 1)


def run_table(shape_names, device, impl_names) -> list[dict]:
    from sparse_attn.block_sparse import block_sparse_attention
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rows = []
    flex = None
    if "flex" in impl_names:
        from torch.nn.attention.flex_attention import flex_attention

        torch._dynamo.config.cache_size_limit = 64
        flex = torch.compile(flex_attention, dynamic=False)
    fa4 = _fa4_direct() if {"fa4-dense", "fa4-sparse"} & impl_names else None
    for sname in shape_names:
        shape = SHAPES[sname]
        mask, n, mask_ms = radial_mask(shape, device)
        density = mask.float().mean().item()
        h = shape["heads"]
        idx_ms = index_build_ms(mask)
        q, k, v = make_qkv(1, h, n, HEAD_DIM, torch.bfloat16, device, layout="bnhd")
        do = torch.randn_like(q)
        dense_flops = 4 * h * n * n * HEAD_DIM
        impls = {}
        if "cudnn" in impl_names:
            def cudnn():
                with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                    return F.scaled_dot_product_attention(q, k, v)
            impls["sdpa-cudnn"] = (cudnn, 1.0)
        if "flash" in impl_names:
            def flash():
                with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                    return F.scaled_dot_product_attention(q, k, v)
            impls["sdpa-flash"] = (flash, 1.0)
        if fa4 is not None and "fa4-dense" in impl_names:
            impls["fa4-dense"] = (lambda: fa4[0](*(x.transpose(1, 2) for x in (q, k, v)))[0].transpose(1, 2), 1.0)
        if flex is not None:
            bm = flex_block_mask(mask, n)
            impls["flex"] = (lambda: flex(q, k, v, block_mask=bm), density)
        if "triton" in impl_names:
            impls["ours-triton"] = (lambda: block_sparse_attention(q, k, v, mask, block_size=BLOCK, backend="triton"), density)
        if "auto" in impl_names:
            # the processors' layout: [B, N, H, D] in, [B, N, H, D] out (no copy on the FA4 path)
            impls["ours-auto"] = (lambda: block_sparse_attention(*(x.transpose(1, 2) for x in (q, k, v)), mask, block_size=BLOCK,
                                                                 layout="bnhd").transpose(1, 2), density)
        if fa4 is not None and "fa4-sparse" in impl_names:
            fwd_t, bwd_t = fa4_lists(mask, fa4[1])
            impls["fa4-sparse"] = (lambda: fa4[0](*(x.transpose(1, 2) for x in (q, k, v)), softmax_scale=HEAD_DIM ** -0.5,
                                                  block_sparse_tensors=fwd_t, block_sparse_tensors_bwd=bwd_t)[0].transpose(1, 2),
                                   density)
        ref_out = None
        for name, (fn, dens) in impls.items():
            rec = dict(part="table", shape=sname, impl=name, n=n, heads=h, density=round(density, 4))
            try:
                with torch.no_grad():
                    t0 = time.perf_counter()
                    out = fn()
                    torch.cuda.synchronize()
                    rec["first_call_s"] = round(time.perf_counter() - t0, 2)  # compile / JIT included
                if name == "ours-triton":
                    ref_out = out
                    rec["mask_build_ms"] = round(mask_ms, 2)
                    rec["index_build_ms"] = round(idx_ms, 2)
                elif dens < 1.0 and ref_out is not None:
                    rec["rel_vs_ours_triton"] = round(rel(out, ref_out), 5)
                del out
                _timed_row(rec, fn, dens, dense_flops, do, (q, k, v))
            except Exception as exc:
                rec["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            log(rec)
            rows.append(rec)
        del q, k, v, do, ref_out
        torch.cuda.empty_cache()
    return rows


SVG2_SHAPES = {"wan41": (41, 30, 52, 12), "wan81": (81, 30, 52, 12)}


def run_svg2(shape_names, device, impl_names) -> list[dict]:
    """SVG2 layouts: the attention of one routing on the range kernel vs as 128-blocks on FA4 (fwd+bwd), plus the
    routing (warm-started k-means, selection, layout) of each path."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import contextlib

    from svg2 import structured_qkv  # benchmarks/svg2.py: planted moving objects, so clusters are real

    from sparse_attn import svg2 as svg2_mod
    from sparse_attn.backends import fa4 as fa4_mod

    rows = []
    for sname in shape_names:
        if sname not in SVG2_SHAPES:
            continue
        frames, lat_h, lat_w, h = SVG2_SHAPES[sname]
        q, k, v = structured_qkv(frames, lat_h, lat_w, h, HEAD_DIM, objects=24, device=device, dtype=torch.bfloat16, seed=0)
        n = q.shape[2]
        cfg = dict(num_q_clusters=100, num_k_clusters=500, top_p=0.9, min_kc_ratio=0.1, text_tokens=0,
                   key_padding_mask=None)
        with torch.no_grad():  # cold routing (not timed) -> warm start for the timed ones, as in training
            prev = svg2_mod._plan(q, k, kmeans_iters=None, state=None, tiles=None,
                                  stage=lambda s: contextlib.nullcontext(), **cfg).state
        paths = {}
        if "triton" in impl_names:
            paths["svg2-triton (range kernel)"] = svg2_mod._tile_config(q)
        if "auto" in impl_names and fa4_mod.unsupported_reason(q, BLOCK) is None:
            paths["svg2-fa4 (128-blocks)"] = None
        do = torch.randn_like(q)
        dense_flops = 4 * h * n * n * HEAD_DIM
        for name, tiles in paths.items():
            rec = dict(part="svg2", shape=sname, impl=name, n=n, heads=h)
            try:
                def route():
                    with torch.no_grad():
                        return svg2_mod._plan(q, k, kmeans_iters=None, state=prev, tiles=tiles,
                                              stage=lambda s: contextlib.nullcontext(), **cfg)

                plan = route()
                rec["density"] = round(plan.state.density, 4)
                if tiles is None:
                    rec["full_blocks"] = int((plan.blocks.block_mask & ~plan.blocks.partial).sum())
                    rec["partial_blocks"] = int(plan.blocks.partial.sum())
                rec["routing_ms"] = round(bench_ms(route), 3)
                with torch.no_grad():
                    qp, kp, vp = (svg2_mod.permute_tokens(t, plan.q_perm if t is q else plan.k_perm,
                                                          plan.q_inv if t is q else plan.k_inv) for t in (q, k, v))
                qp, kp, vp = (t.detach().requires_grad_() for t in (qp, kp, vp))
                if tiles is None:
                    fn = lambda: svg2_mod.blocks_attention(qp, kp, vp, plan.blocks, backend="fa4")  # noqa: E731
                else:
                    from sparse_attn.ops import range_attention

                    fn = lambda: range_attention(qp, kp, vp, plan.layout)  # noqa: E731
                _timed_row(rec, fn, plan.state.density, dense_flops, do, (qp, kp, vp))
                rec["routing_share"] = round(rec["routing_ms"] / (rec["routing_ms"] + rec["fwdbwd_ms"]), 3)
                del qp, kp, vp, plan
            except Exception as exc:
                rec["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            log(rec)
            rows.append(rec)
        del q, k, v, do
        torch.cuda.empty_cache()
    return rows


def markdown_svg2(rows: list[dict], dense: dict[str, dict]) -> str:
    lines = [
        "| shape | N | density | path | routing ms | attention fwd+bwd ms | eff. TFLOP/s | x dense cuDNN per FLOP | routing share | full / partial blocks |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['n']} | - | {r['impl']} | error: {r['error'][:80]} ||||||")
            continue
        d = dense.get(r["shape"], {}).get("fwdbwd_tflops")
        ratio = f"{r['fwdbwd_tflops'] / d:.2f}" if d else "-"
        blocks = f"{r['full_blocks']} / {r['partial_blocks']}" if "full_blocks" in r else "-"
        lines.append(f"| {r['shape']} | {r['n']} | {r['density']:.3f} | {r['impl']} | {r['routing_ms']:.1f} | "
                     f"{r['fwdbwd_ms']:.1f} | {r['fwdbwd_tflops']:.0f} | {ratio} | {r['routing_share']:.1%} | {blocks} |")
    return "\n".join(lines)


def markdown(rows: list[dict]) -> str:
    by_shape: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_shape.setdefault(r["shape"], {})[r["impl"]] = r
    lines = [
        "| shape | N | H | density | impl | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | x dense (cuDNN) | x Flex | x FA4-sparse | peak GB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for sname, impls in by_shape.items():
        dense = impls.get("sdpa-cudnn", {})
        flex = impls.get("flex", {})
        fa4s = impls.get("fa4-sparse", {})
        for name, r in impls.items():
            if "error" in r:
                lines.append(f"| {sname} | {r['n']} | {r['heads']} | {r['density']:.3f} | {name} | error: {r['error'][:60]} ||||||||")
                continue
            sd = f"{dense['fwdbwd_ms'] / r['fwdbwd_ms']:.2f}" if "fwdbwd_ms" in dense else "-"
            sf = f"{flex['fwdbwd_ms'] / r['fwdbwd_ms']:.2f}" if "fwdbwd_ms" in flex else "-"
            s4 = f"{fa4s['fwdbwd_ms'] / r['fwdbwd_ms']:.2f}" if "fwdbwd_ms" in fa4s else "-"
            fwd = f"{r['fwd_ms']:.1f} | {r['fwd_tflops']:.0f}" if "fwd_ms" in r else "- | -"
            peak = f"{r['peak_fwdbwd_gb']:.2f}" if "peak_fwdbwd_gb" in r else "-"
            lines.append(
                f"| {sname} | {r['n']} | {r['heads']} | {r['density']:.3f} | {name} | {fwd} | "
                f"{r['fwdbwd_ms']:.1f} | {r['fwdbwd_tflops']:.0f} | {sd} | {sf} | {s4} | {peak} |"
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
    p.add_argument("--svg2", action="store_true", help="SVG2 layouts: range kernel vs 128-blocks on FA4")
    p.add_argument("--impls", default="cudnn,fa4-dense,flex,triton,auto,fa4-sparse",
                   help="table columns: cudnn, flash, fa4-dense, flex, triton, auto, fa4-sparse")
    p.add_argument("--baselines", default=None, help="(older spelling) dense/Flex columns; ours-auto is always added")
    p.add_argument("--quick", action="store_true", help="fwd+bwd only, fewer repetitions")
    p.add_argument("--out", default=".")
    args = p.parse_args(argv)
    global _QUICK
    _QUICK = args.quick
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
    impls = set(args.impls.split(",")) if args.baselines is None else set(args.baselines.split(",")) | {"auto"}
    shapes = [s for s in args.shapes.split(",") if s]
    rows: list[dict] = []
    svg2_rows: list[dict] = []

    def write_md() -> str:
        """table.md from what has run so far (rewritten after every shape: a timed-out run keeps its rows)."""
        md = markdown(rows) + "\n" if rows else ""
        if svg2_rows:
            dense = {r["shape"]: r for r in rows if r["impl"] == "sdpa-cudnn" and "error" not in r}
            md += "\n" + markdown_svg2(svg2_rows, dense) + "\n"
        with open(os.path.join(_out_dir, "table.md"), "w") as f:
            f.write(md)
        return md

    if args.svg2:  # first: its shapes are the short ones
        svg2_rows += run_svg2(shapes, device, impls)
        write_md()
    if args.table:
        for shape in shapes:
            rows += run_table([shape], device, impls)
            write_md()
    if rows or svg2_rows:
        print(write_md())
    return status


if __name__ == "__main__":
    raise SystemExit(main())
