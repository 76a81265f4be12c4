"""Triton kernels for block-sparse attention: forward, backward preprocess (delta), dK/dV, dQ, launchers.

Read top to bottom like the Triton fused-attention tutorial.  Conventions shared by every kernel:

* ``q, k, v, o`` and their gradients are ``[B, H, N, D]`` with any strides (the last one is specialised to 1
  by Triton when it is); offsets of one (batch, head) slice are int64, offsets inside a slice int32.
* The sparsity comes as CSR block lists (see ``sparse_attn/indices.py``): row ``g * Nb + i`` of
  ``kv_ptr/kv_idx`` lists, ascending, the key blocks kept for query block ``i`` of mask group ``g``;
  ``q_ptr/q_idx`` is the transpose.  ``group = b * group_b + h * group_h``.
* Programs are launched in the order of a *schedule* (int32 entries ``(b*H + h) * Nb + block``): heads of
  one batch together, longest rows first.  A sparse block of ``BLOCK_SIZE`` rows may be split into
  ``BLOCK_SIZE // tile`` stationary tiles, the split index being the fastest-moving part of the program id.
* Scores live in the log2 domain: ``s = (q . k) * scale * log2(e)`` in fp32 after the dot (K is never
  prescaled in low precision), ``p = exp2(s - lse)``.  The forward stores ``lse = m + log2(l)`` in fp32 into
  a buffer padded to ``Nb * BLOCK_SIZE`` rows per head; a row without any valid key stores ``+inf`` so
  that the backward's ``exp2(s - lse)`` is exactly 0 there (and its output row is 0).
* Sequence tail: when ``N % BLOCK_SIZE != 0`` the last block is partial.  Block lists are sorted, so a
  partial block can only be the *last* entry of a list: every loop runs unmasked over the full blocks and
  then once more, masked, over the tail block (``EVEN_N`` removes that second loop altogether).
* ``HAS_KPM`` (key padding mask, ``uint8 [B, N]``, 1 = valid key) is a constexpr branch: without a mask the
  kernels carry no per-key test at all.
* ``USE_TMA`` streams tiles through 4-D host tensor descriptors instead of pointer loads (Hopper TMA);
  measured no faster on an H200, so it is off by default but kept as a tuning option.
* Tuning variants, all constexpr and all off in :func:`default_configs` until a sweep on the GPU
  (``benchmarks/kernel_variants.py``) shows them faster: ``WS`` (``tl.range(warp_specialize=True)`` on the
  streamed loop; Triton >= 3.5), ``FOLD`` (forward: row max on the raw scores, the scale folded into the
  exponent's FMA), ``LAZY`` (forward: rescale the accumulator only when some row max grew by more than
  ``LAZY_THRESHOLD`` in log2 units, FA4's trick), ``Q_MAJOR`` (dK/dV pass: scores as Q K^T rather than K Q^T)
  and the single-pass backward (dK/dV program that also adds its dQ share into an fp32 buffer with atomics:
  five GEMMs instead of seven, not bit-reproducible).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..interpreter import interpreting

__all__ = [
    "KernelConfig",
    "default_configs",
    "block_sparse_forward",
    "block_sparse_backward",
]

LOG2E = 1.4426950408889634
#: LAZY forward: the accumulator is rescaled only when a row max grew by more than this (log2 units), so
#: unnormalised probabilities stay below 2**8 - harmless in fp32 and in the bf16/fp16 P of the PV GEMM.
LAZY_THRESHOLD = tl.constexpr(8.0)


# ---------------------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _load_kv(k_src, v_src, stride_kn, stride_vn, b, h, start, rows, n_ctx, offs_d,
             HEAD_DIM: tl.constexpr, ROWS: tl.constexpr, MASK_TAIL: tl.constexpr, USE_TMA: tl.constexpr):
    """Load one streamed ``[ROWS, HEAD_DIM]`` tile of two tensors (K and V, or Q and dO).

    With ``USE_TMA`` the sources are 4-D tensor descriptors (rows past N come back as zeros); otherwise they
    are pointers to the (batch, head) slice and the tail tile is loaded under a row mask.
    """
    if USE_TMA:
        x = k_src.load([b, h, start, 0]).reshape(ROWS, HEAD_DIM)
        y = v_src.load([b, h, start, 0]).reshape(ROWS, HEAD_DIM)
    elif MASK_TAIL:
        ok = (rows < n_ctx)[:, None]
        x = tl.load(k_src + rows[:, None] * stride_kn + offs_d[None, :], mask=ok, other=0.0)
        y = tl.load(v_src + rows[:, None] * stride_vn + offs_d[None, :], mask=ok, other=0.0)
    else:
        x = tl.load(k_src + rows[:, None] * stride_kn + offs_d[None, :])
        y = tl.load(v_src + rows[:, None] * stride_vn + offs_d[None, :])
    return x, y


@triton.jit
def _fwd_step(
    acc, l_i, m_i, q, t,
    k_src, v_src, stride_kn, stride_vn, kpm_base, idx_ptr, b, h,
    n_ctx, qk_scale,
    offs_n, offs_d,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_TAIL: tl.constexpr, HAS_KPM: tl.constexpr, PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
    FOLD: tl.constexpr, LAZY: tl.constexpr,
):
    """One key tile ``t`` (sub-tile ``t % SUB`` of list entry ``t // SUB``) of the online softmax."""
    SUB: tl.constexpr = BLOCK_SIZE // BLOCK_N
    blk = tl.load(idx_ptr + t // SUB)
    start = blk * BLOCK_SIZE + (t % SUB) * BLOCK_N
    cols = start + offs_n
    k, v = _load_kv(k_src, v_src, stride_kn, stride_vn, b, h, start, cols, n_ctx, offs_d,
                    HEAD_DIM, BLOCK_N, MASK_TAIL, USE_TMA)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    if not FOLD:
        s = s * qk_scale
    if MASK_TAIL or HAS_KPM:
        if MASK_TAIL:
            valid = cols < n_ctx
            if HAS_KPM:
                valid = valid & (tl.load(kpm_base + cols, mask=valid, other=0) != 0)
        else:
            valid = tl.load(kpm_base + cols) != 0
        s = tl.where(valid[None, :], s, float("-inf"))
    if FOLD:  # qk_scale > 0 (the launcher checks): max of scaled = scaled max, one FMUL per row not per score
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1))
    if LAZY:
        # rescale only when some row's max grew by more than the threshold (a -inf -> finite step always does)
        grow = tl.max(tl.where(m_new > m_i, m_new - m_i, 0.0), 0)
        if grow > LAZY_THRESHOLD:
            m_fix = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.math.exp2(m_i - m_fix)
            l_i = l_i * alpha
            acc = acc * alpha[:, None]
            m_i = m_new
        # a row whose keys are all masked so far keeps m = -inf; subtract 0 instead to avoid inf - inf
        m_use = tl.where(m_i == float("-inf"), 0.0, m_i)
    else:
        if MASK_TAIL or HAS_KPM:
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_use = m_new
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha
        acc = acc * alpha[:, None]
        m_i = m_new
    if FOLD:
        p = tl.math.exp2(s * qk_scale - m_use[:, None])
    else:
        p = tl.math.exp2(s - m_use[:, None])
    l_i = l_i + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
    return acc, l_i, m_i


@triton.jit
def _fwd_loop(
    acc, l_i, m_i, q,
    k_src, v_src, stride_kn, stride_vn, kpm_base, idx_ptr, b, h,
    lo, hi, n_ctx, qk_scale,
    offs_n, offs_d,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_TAIL: tl.constexpr, HAS_KPM: tl.constexpr, PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
    FOLD: tl.constexpr, LAZY: tl.constexpr, WS: tl.constexpr,
):
    """Online softmax over the key tiles ``lo .. hi``.  ``WS``: let Triton warp-specialise the loop (only
    this branch mentions ``warp_specialize``, so Triton versions without it never see the keyword)."""
    if WS:
        for t in tl.range(lo, hi, warp_specialize=True):
            acc, l_i, m_i = _fwd_step(
                acc, l_i, m_i, q, t, k_src, v_src, stride_kn, stride_vn, kpm_base, idx_ptr, b, h, n_ctx, qk_scale,
                offs_n, offs_d, HEAD_DIM, BLOCK_SIZE, BLOCK_N, MASK_TAIL, HAS_KPM, PRECISION, USE_TMA, FOLD, LAZY,
            )
    else:
        for t in range(lo, hi):
            acc, l_i, m_i = _fwd_step(
                acc, l_i, m_i, q, t, k_src, v_src, stride_kn, stride_vn, kpm_base, idx_ptr, b, h, n_ctx, qk_scale,
                offs_n, offs_d, HEAD_DIM, BLOCK_SIZE, BLOCK_N, MASK_TAIL, HAS_KPM, PRECISION, USE_TMA, FOLD, LAZY,
            )
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(
    Q, K, V, O, LSE, KPM,
    kv_ptr, kv_idx, sched,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    stride_kpm,
    H, n_ctx, n_blocks, group_b, group_h, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN_N: tl.constexpr, HAS_KPM: tl.constexpr, PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
    FOLD: tl.constexpr, LAZY: tl.constexpr, WS: tl.constexpr,
):
    """One program = one ``BLOCK_M``-row tile of one query block of one (batch, head)."""
    M_SUB: tl.constexpr = BLOCK_SIZE // BLOCK_M
    N_SUB: tl.constexpr = BLOCK_SIZE // BLOCK_N
    pid = tl.program_id(0)
    entry = tl.load(sched + pid // M_SUB)
    bh = entry // n_blocks
    qblk = entry % n_blocks
    b = bh // H
    h = bh % H
    row = (b * group_b + h * group_h) * n_blocks + qblk
    lo = tl.load(kv_ptr + row)
    hi = tl.load(kv_ptr + row + 1)

    offs_m = qblk * BLOCK_SIZE + (pid % M_SUB) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    if USE_TMA:
        k_src = K
        v_src = V
    else:
        k_src = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
        v_src = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    kpm_base = KPM + b.to(tl.int64) * stride_kpm
    row_ok = offs_m < n_ctx
    q = tl.load(q_base + offs_m[:, None] * stride_qn + offs_d[None, :], mask=row_ok[:, None], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if EVEN_N:
        acc, l_i, m_i = _fwd_loop(
            acc, l_i, m_i, q, k_src, v_src, stride_kn, stride_vn, kpm_base, kv_idx, b, h,
            lo * N_SUB, hi * N_SUB, n_ctx, qk_scale, offs_n, offs_d,
            HEAD_DIM, BLOCK_SIZE, BLOCK_N, False, HAS_KPM, PRECISION, USE_TMA, FOLD, LAZY, WS,
        )
    else:
        last = tl.load(kv_idx + tl.maximum(hi - 1, 0))
        full_hi = hi - ((hi > lo) & (last == n_blocks - 1)).to(tl.int32)
        acc, l_i, m_i = _fwd_loop(
            acc, l_i, m_i, q, k_src, v_src, stride_kn, stride_vn, kpm_base, kv_idx, b, h,
            lo * N_SUB, full_hi * N_SUB, n_ctx, qk_scale, offs_n, offs_d,
            HEAD_DIM, BLOCK_SIZE, BLOCK_N, False, HAS_KPM, PRECISION, USE_TMA, FOLD, LAZY, WS,
        )
        acc, l_i, m_i = _fwd_loop(
            acc, l_i, m_i, q, k_src, v_src, stride_kn, stride_vn, kpm_base, kv_idx, b, h,
            full_hi * N_SUB, hi * N_SUB, n_ctx, qk_scale, offs_n, offs_d,
            HEAD_DIM, BLOCK_SIZE, BLOCK_N, True, HAS_KPM, PRECISION, USE_TMA, FOLD, LAZY, WS,
        )

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(l_safe))
    o_base = O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    tl.store(o_base + offs_m[:, None] * stride_on + offs_d[None, :], out.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + bh.to(tl.int64) * (n_blocks * BLOCK_SIZE) + offs_m, lse)


# ---------------------------------------------------------------------------------------------------------
# Backward preprocess: delta = rowsum(dO * O), fp32, zero on the padded tail rows
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _attn_bwd_delta(
    O, DO, DELTA,
    stride_ob, stride_oh, stride_on,
    stride_dob, stride_doh, stride_don,
    H, n_ctx, n_pad,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    ok = (rows < n_ctx)[:, None]
    o = tl.load(O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + rows[:, None] * stride_on + offs_d[None, :], mask=ok, other=0.0)
    do = tl.load(DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh + rows[:, None] * stride_don + offs_d[None, :], mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + bh.to(tl.int64) * n_pad + rows, delta)


# ---------------------------------------------------------------------------------------------------------
# Backward dK/dV: K, V stationary; walk the query blocks that attend to this key block (transposed lists).
# With DQ_MODE != 0 the same program also adds its share of dQ into an fp32 buffer (single-pass backward).
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _dkdv_step(
    dk, dv, k, v, kv_valid, t,
    q_src, do_src, stride_qn, stride_don, lse_base, delta_base, dq_dst, idx_ptr, b, h, bh,
    n_ctx, qk_scale,
    offs_m, offs_d,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr,
    MASK_TAIL: tl.constexpr, HAS_KPM: tl.constexpr, PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
    DQ_MODE: tl.constexpr, Q_MAJOR: tl.constexpr,
):
    """One query tile ``t``.  DQ_MODE: 0 none, 1 ``tl.atomic_add`` of dS^T K, 2 the same product computed
    transposed (K^T dS, FA3's swapAB: the 128-wide head dim is the GEMM's M; same as 1 with Q_MAJOR),
    3 TMA reduce-add.  Q_MAJOR: scores laid out [queries, keys] instead of [keys, queries]."""
    SUB: tl.constexpr = BLOCK_SIZE // BLOCK_M
    blk = tl.load(idx_ptr + t // SUB)
    start = blk * BLOCK_SIZE + (t % SUB) * BLOCK_M
    rows = start + offs_m
    q, do = _load_kv(q_src, do_src, stride_qn, stride_don, b, h, start, rows, n_ctx, offs_d,
                     HEAD_DIM, BLOCK_M, MASK_TAIL, USE_TMA)
    lse = tl.load(lse_base + rows)  # padded buffers: no mask needed
    delta = tl.load(delta_base + rows)
    if Q_MAJOR:
        # scores as [queries, keys]: K and V are only ever the B operand of a GEMM (shared memory), dQ = dS K
        # needs no transpose; dV and dK take the transposed P / dS as their A operand instead
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        p = tl.math.exp2(s - lse[:, None])
        if DQ_MODE != 0:
            if HAS_KPM:  # padded keys must not reach dQ (tail keys have k = 0 and add nothing)
                p = tl.where(kv_valid[None, :], p, 0.0)
        dv = tl.dot(tl.trans(p.to(do.dtype)), do, dv, input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = (p * (dp - delta[:, None])).to(q.dtype)
        dk = tl.dot(tl.trans(ds), q, dk, input_precision=PRECISION)
        if DQ_MODE == 1 or DQ_MODE == 2:
            dq = tl.dot(ds, k, input_precision=PRECISION)
            tl.atomic_add(dq_dst + rows[:, None] * HEAD_DIM + offs_d[None, :], dq, sem="relaxed")
        elif DQ_MODE == 3:
            dq = tl.dot(ds, k, input_precision=PRECISION)
            dq_dst.atomic_add([bh, start, 0], dq.reshape(1, BLOCK_M, HEAD_DIM))
    else:
        # transposed scores: [keys, queries]; padded query rows have q = dO = 0 and contribute nothing
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
        p_t = tl.math.exp2(s_t - lse[None, :])
        if DQ_MODE != 0:
            if HAS_KPM:  # padded keys must not reach dQ (tail keys have k = 0 and add nothing)
                p_t = tl.where(kv_valid[:, None], p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
        dk = tl.dot(ds_t, q, dk, input_precision=PRECISION)
        if DQ_MODE == 1:
            dq = tl.dot(tl.trans(ds_t), k, input_precision=PRECISION)
            tl.atomic_add(dq_dst + rows[:, None] * HEAD_DIM + offs_d[None, :], dq, sem="relaxed")
        elif DQ_MODE == 2:
            dq_t = tl.dot(tl.trans(k), ds_t, input_precision=PRECISION)
            tl.atomic_add(dq_dst + rows[None, :] * HEAD_DIM + offs_d[:, None], dq_t, sem="relaxed")
        elif DQ_MODE == 3:
            dq = tl.dot(tl.trans(ds_t), k, input_precision=PRECISION)
            dq_dst.atomic_add([bh, start, 0], dq.reshape(1, BLOCK_M, HEAD_DIM))
    return dk, dv


@triton.jit
def _dkdv_loop(
    dk, dv, k, v, kv_valid,
    q_src, do_src, stride_qn, stride_don, lse_base, delta_base, dq_dst, idx_ptr, b, h, bh,
    lo, hi, n_ctx, qk_scale,
    offs_m, offs_d,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr,
    MASK_TAIL: tl.constexpr, HAS_KPM: tl.constexpr, PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
    DQ_MODE: tl.constexpr, WS: tl.constexpr, Q_MAJOR: tl.constexpr,
):
    if WS:
        for t in tl.range(lo, hi, warp_specialize=True):
            dk, dv = _dkdv_step(
                dk, dv, k, v, kv_valid, t, q_src, do_src, stride_qn, stride_don, lse_base, delta_base, dq_dst, idx_ptr,
                b, h, bh, n_ctx, qk_scale, offs_m, offs_d,
                HEAD_DIM, BLOCK_SIZE, BLOCK_M, MASK_TAIL, HAS_KPM, PRECISION, USE_TMA, DQ_MODE, Q_MAJOR,
            )
    else:
        for t in range(lo, hi):
            dk, dv = _dkdv_step(
                dk, dv, k, v, kv_valid, t, q_src, do_src, stride_qn, stride_don, lse_base, delta_base, dq_dst, idx_ptr,
                b, h, bh, n_ctx, qk_scale, offs_m, offs_d,
                HEAD_DIM, BLOCK_SIZE, BLOCK_M, MASK_TAIL, HAS_KPM, PRECISION, USE_TMA, DQ_MODE, Q_MAJOR,
            )
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO, DK, DV, LSE, DELTA, KPM, DQ_ACC,
    q_ptr, q_idx, sched,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_kpm,
    H, n_ctx, n_blocks, group_b, group_h, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN_N: tl.constexpr, HAS_KPM: tl.constexpr, PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
    DQ_MODE: tl.constexpr, WS: tl.constexpr, Q_MAJOR: tl.constexpr,
):
    """One program = one ``BLOCK_N``-row tile of one key block; streams ``BLOCK_M``-row query tiles.

    ``DQ_MODE == 0`` (default): no atomics, dQ has its own pass (below), so all three gradients are
    deterministic.  Otherwise this program also reduce-adds dS^T K (unscaled, fp32) into ``DQ_ACC``
    (``[B*H, Nb*BLOCK_SIZE, D]``; a 3-D tensor descriptor for mode 3): five GEMMs per block pair instead of
    seven, but an earlier try (docs/benchmarks.md) measured 1.2-2x slower on an H200 from register spills
    and reduction traffic - hence a sweep variant, not the default.
    """
    N_SUB: tl.constexpr = BLOCK_SIZE // BLOCK_N
    M_SUB: tl.constexpr = BLOCK_SIZE // BLOCK_M
    pid = tl.program_id(0)
    entry = tl.load(sched + pid // N_SUB)
    bh = entry // n_blocks
    kblk = entry % n_blocks
    b = bh // H
    h = bh % H
    col = (b * group_b + h * group_h) * n_blocks + kblk
    lo = tl.load(q_ptr + col)
    hi = tl.load(q_ptr + col + 1)

    offs_n = kblk * BLOCK_SIZE + (pid % N_SUB) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    key_ok = offs_n < n_ctx
    k = tl.load(K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :], mask=key_ok[:, None], other=0.0)
    v = tl.load(V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :], mask=key_ok[:, None], other=0.0)
    if HAS_KPM:
        kv_valid = tl.load(KPM + b.to(tl.int64) * stride_kpm + offs_n, mask=key_ok, other=0) != 0
    else:
        kv_valid = key_ok
    if USE_TMA:
        q_src = Q
        do_src = DO
    else:
        q_src = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        do_src = DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
    if DQ_MODE == 3:
        dq_dst = DQ_ACC
    else:
        dq_dst = DQ_ACC + bh.to(tl.int64) * (n_blocks * BLOCK_SIZE * HEAD_DIM)
    lse_base = LSE + bh.to(tl.int64) * (n_blocks * BLOCK_SIZE)
    delta_base = DELTA + bh.to(tl.int64) * (n_blocks * BLOCK_SIZE)

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    if EVEN_N:
        dk, dv = _dkdv_loop(
            dk, dv, k, v, kv_valid, q_src, do_src, stride_qn, stride_don, lse_base, delta_base, dq_dst, q_idx, b, h, bh,
            lo * M_SUB, hi * M_SUB, n_ctx, qk_scale, offs_m, offs_d,
            HEAD_DIM, BLOCK_SIZE, BLOCK_M, False, HAS_KPM, PRECISION, USE_TMA, DQ_MODE, WS, Q_MAJOR,
        )
    else:
        last = tl.load(q_idx + tl.maximum(hi - 1, 0))
        full_hi = hi - ((hi > lo) & (last == n_blocks - 1)).to(tl.int32)
        dk, dv = _dkdv_loop(
            dk, dv, k, v, kv_valid, q_src, do_src, stride_qn, stride_don, lse_base, delta_base, dq_dst, q_idx, b, h, bh,
            lo * M_SUB, full_hi * M_SUB, n_ctx, qk_scale, offs_m, offs_d,
            HEAD_DIM, BLOCK_SIZE, BLOCK_M, False, HAS_KPM, PRECISION, USE_TMA, DQ_MODE, WS, Q_MAJOR,
        )
        dk, dv = _dkdv_loop(
            dk, dv, k, v, kv_valid, q_src, do_src, stride_qn, stride_don, lse_base, delta_base, dq_dst, q_idx, b, h, bh,
            full_hi * M_SUB, hi * M_SUB, n_ctx, qk_scale, offs_m, offs_d,
            HEAD_DIM, BLOCK_SIZE, BLOCK_M, True, HAS_KPM, PRECISION, USE_TMA, DQ_MODE, WS, Q_MAJOR,
        )
    # Rows of dK/dV depend only on their own key, so keys outside the softmax (padding, tail) are fixed up
    # once here instead of masking every tile: their gradient is 0 (and tail rows are not stored at all).
    if HAS_KPM:
        dk = tl.where(kv_valid[:, None], dk, 0.0)
        dv = tl.where(kv_valid[:, None], dv, 0.0)
    dk = dk * sm_scale
    tl.store(DK + b.to(tl.int64) * stride_dkb + h.to(tl.int64) * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=key_ok[:, None])
    tl.store(DV + b.to(tl.int64) * stride_dvb + h.to(tl.int64) * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=key_ok[:, None])


# ---------------------------------------------------------------------------------------------------------
# Backward dQ: Q, dO stationary; walk the forward lists
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _dq_step(
    dq, q, do, lse, delta, t,
    k_src, v_src, stride_kn, stride_vn, kpm_base, idx_ptr, b, h,
    n_ctx, qk_scale,
    offs_n, offs_d,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_TAIL: tl.constexpr, HAS_KPM: tl.constexpr, PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
):
    SUB: tl.constexpr = BLOCK_SIZE // BLOCK_N
    blk = tl.load(idx_ptr + t // SUB)
    start = blk * BLOCK_SIZE + (t % SUB) * BLOCK_N
    cols = start + offs_n
    k, v = _load_kv(k_src, v_src, stride_kn, stride_vn, b, h, start, cols, n_ctx, offs_d,
                    HEAD_DIM, BLOCK_N, MASK_TAIL, USE_TMA)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    p = tl.math.exp2(s - lse[:, None])
    if MASK_TAIL or HAS_KPM:
        if MASK_TAIL:
            valid = cols < n_ctx
            if HAS_KPM:
                valid = valid & (tl.load(kpm_base + cols, mask=valid, other=0) != 0)
        else:
            valid = tl.load(kpm_base + cols) != 0
        p = tl.where(valid[None, :], p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    return dq


@triton.jit
def _dq_loop(
    dq, q, do, lse, delta,
    k_src, v_src, stride_kn, stride_vn, kpm_base, idx_ptr, b, h,
    lo, hi, n_ctx, qk_scale,
    offs_n, offs_d,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_TAIL: tl.constexpr, HAS_KPM: tl.constexpr, PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
    WS: tl.constexpr,
):
    if WS:
        for t in tl.range(lo, hi, warp_specialize=True):
            dq = _dq_step(dq, q, do, lse, delta, t, k_src, v_src, stride_kn, stride_vn, kpm_base, idx_ptr, b, h,
                          n_ctx, qk_scale, offs_n, offs_d,
                          HEAD_DIM, BLOCK_SIZE, BLOCK_N, MASK_TAIL, HAS_KPM, PRECISION, USE_TMA)
    else:
        for t in range(lo, hi):
            dq = _dq_step(dq, q, do, lse, delta, t, k_src, v_src, stride_kn, stride_vn, kpm_base, idx_ptr, b, h,
                          n_ctx, qk_scale, offs_n, offs_d,
                          HEAD_DIM, BLOCK_SIZE, BLOCK_N, MASK_TAIL, HAS_KPM, PRECISION, USE_TMA)
    return dq


@triton.jit
def _attn_bwd_dq(
    Q, K, V, DO, DQ, LSE, DELTA, KPM,
    kv_ptr, kv_idx, sched,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    stride_dqb, stride_dqh, stride_dqn,
    stride_kpm,
    H, n_ctx, n_blocks, group_b, group_h, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN_N: tl.constexpr, HAS_KPM: tl.constexpr, PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
    WS: tl.constexpr,
):
    """One program = one ``BLOCK_M``-row tile of one query block; streams ``BLOCK_N``-row key tiles."""
    M_SUB: tl.constexpr = BLOCK_SIZE // BLOCK_M
    N_SUB: tl.constexpr = BLOCK_SIZE // BLOCK_N
    pid = tl.program_id(0)
    entry = tl.load(sched + pid // M_SUB)
    bh = entry // n_blocks
    qblk = entry % n_blocks
    b = bh // H
    h = bh % H
    row = (b * group_b + h * group_h) * n_blocks + qblk
    lo = tl.load(kv_ptr + row)
    hi = tl.load(kv_ptr + row + 1)

    offs_m = qblk * BLOCK_SIZE + (pid % M_SUB) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = (offs_m < n_ctx)[:, None]
    q = tl.load(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :], mask=row_ok, other=0.0)
    do = tl.load(DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh + offs_m[:, None] * stride_don + offs_d[None, :], mask=row_ok, other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * (n_blocks * BLOCK_SIZE) + offs_m)
    delta = tl.load(DELTA + bh.to(tl.int64) * (n_blocks * BLOCK_SIZE) + offs_m)
    if USE_TMA:
        k_src = K
        v_src = V
    else:
        k_src = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
        v_src = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    kpm_base = KPM + b.to(tl.int64) * stride_kpm

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if EVEN_N:
        dq = _dq_loop(
            dq, q, do, lse, delta, k_src, v_src, stride_kn, stride_vn, kpm_base, kv_idx, b, h,
            lo * N_SUB, hi * N_SUB, n_ctx, qk_scale, offs_n, offs_d, HEAD_DIM, BLOCK_SIZE, BLOCK_N, False, HAS_KPM, PRECISION, USE_TMA, WS,
        )
    else:
        last = tl.load(kv_idx + tl.maximum(hi - 1, 0))
        full_hi = hi - ((hi > lo) & (last == n_blocks - 1)).to(tl.int32)
        dq = _dq_loop(
            dq, q, do, lse, delta, k_src, v_src, stride_kn, stride_vn, kpm_base, kv_idx, b, h,
            lo * N_SUB, full_hi * N_SUB, n_ctx, qk_scale, offs_n, offs_d, HEAD_DIM, BLOCK_SIZE, BLOCK_N, False, HAS_KPM, PRECISION, USE_TMA, WS,
        )
        dq = _dq_loop(
            dq, q, do, lse, delta, k_src, v_src, stride_kn, stride_vn, kpm_base, kv_idx, b, h,
            full_hi * N_SUB, hi * N_SUB, n_ctx, qk_scale, offs_n, offs_d, HEAD_DIM, BLOCK_SIZE, BLOCK_N, True, HAS_KPM, PRECISION, USE_TMA, WS,
        )
    dq = dq * sm_scale
    tl.store(DQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh + offs_m[:, None] * stride_dqn + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=row_ok)


# ---------------------------------------------------------------------------------------------------------
# Launch wrappers
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelConfig:
    """Tile shape, launch parameters and code variants of one kernel.

    ``block_m`` rows of queries and ``block_n`` rows of keys per tile; both divide the sparse block size.
    The stationary tile is the queries in the forward and dQ pass and the keys in the dK/dV pass.
    """

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    tma: bool = False  # stream tiles through 4-D tensor descriptors (Hopper TMA) when the layout allows
    #: ``tl.range(warp_specialize=True)`` on the streamed loop (Triton >= 3.5 on Hopper/Blackwell; ignored by
    #: Triton versions without the keyword and by the interpreter).
    warp_specialize: bool = False
    #: forward only: row max on the raw scores and ``exp2(s * scale - m)`` as one FMA (used when scale > 0).
    fold_scale: bool = False
    #: forward only: rescale the accumulator only when some row max grew by more than LAZY_THRESHOLD.
    lazy_rescale: bool = False
    #: single-pass backward only, how dQ shares are added into the fp32 buffer: "atomic" (``tl.atomic_add``,
    #: relaxed), "atomic_swap" (the same with K^T dS computed transposed) or "tma" (descriptor reduce-add).
    dq_reduce: str = "atomic"
    #: dK/dV pass (two-pass or single-pass): scores as Q K^T ([queries, keys], FA2/FA3's orientation) so that K and V
    #: are only ever GEMM B operands in shared memory - fewer live registers than K Q^T, the layout of the default.
    q_major: bool = False


DQ_REDUCE_MODES = {"atomic": 1, "atomic_swap": 2, "tma": 3}


def _ws_supported() -> bool:
    """Whether this Triton's ``tl.range`` takes ``warp_specialize`` (3.4+); older versions run the plain loop."""
    import inspect

    try:
        return "warp_specialize" in inspect.signature(tl.range.__init__).parameters
    except (TypeError, ValueError):  # pragma: no cover - unusual builds
        return False


_WS_SUPPORTED = _ws_supported()


def default_configs(head_dim: int, dtype: torch.dtype, block_size: int) -> dict[str, KernelConfig]:
    """Per-kernel configs ('fwd', 'dkdv', 'dq'; optionally 'single_pass') for bf16/fp16, picked by the sweeps in
    benchmarks/attention.py and benchmarks/kernel_variants.py.

    Measured on an H200 at Wan2.1 81 x 1560 tokens (D=128, 128-blocks; docs/benchmarks.md): a 128 x 128
    forward tile with 3 stages beats 128 x 64, and folding the scale into one FMA (``fold_scale``) saves 3% of
    the forward; the dK/dV pass is fastest with 64-row stationary key tiles, 4 warps (fewer live fp32
    accumulators per thread) and 4 stages (1% over 3), the dQ pass with 128 x 64 and 8 warps.  Lazy rescaling,
    q-major dK/dV, warp specialisation and every single-pass backward measured no faster (or failed to compile).  fp32
    runs the dots in true fp32 (no tensor cores) with small tiles that fit registers.  A 'single_pass' entry,
    when present, replaces the dK/dV + dQ pair for non-deterministic backwards (none is: not measured faster).
    """
    if dtype == torch.float32:
        warps = 8 if head_dim > 64 else 4  # fp32 tiles at D=128 spill registers with 4 warps
        return {
            "fwd": KernelConfig(64, 32, 4, 2),
            "dkdv": KernelConfig(32, 32 if head_dim > 64 else 64, warps, 2),
            "dq": KernelConfig(64, 32, warps, 2),
        }
    if block_size == 64:
        return {"fwd": KernelConfig(64, 64, 4, 3), "dkdv": KernelConfig(64, 64, 4, 3), "dq": KernelConfig(64, 64, 4, 3)}
    return {
        "fwd": KernelConfig(128, 128, 8, 3, fold_scale=True),
        "dkdv": KernelConfig(64, 64, 4, 4),
        "dq": KernelConfig(128, 64, 8, 2 if head_dim > 64 else 3),
    }


def _check_config(cfg: KernelConfig, block_size: int, what: str) -> None:
    for name in ("block_m", "block_n"):
        tile = getattr(cfg, name)
        if tile <= 0 or block_size % tile != 0 or tile & (tile - 1):
            raise ValueError(f"{what} config: {name}={tile} must be a power of two dividing block_size={block_size}")
    if cfg.dq_reduce not in DQ_REDUCE_MODES:
        raise ValueError(f"{what} config: dq_reduce={cfg.dq_reduce!r} must be one of {tuple(DQ_REDUCE_MODES)}")


def _tma_ok(*tensors: torch.Tensor) -> bool:
    """TMA needs 16-byte aligned base addresses and strides (last stride 1) - and a real GPU."""
    if not interpreting() and not all(t.is_cuda for t in tensors):
        return False
    for t in tensors:
        size = t.element_size()
        if t.data_ptr() % 16 or t.stride(-1) != 1:
            return False
        if any(st <= 0 or (st * size) % 16 for st in t.stride()[:-1]):
            return False
    return True


def _streamed(x: torch.Tensor, rows: int, use_tma: bool):
    """The kernel argument for a streamed tensor: itself, or a 4-D descriptor of ``[1, 1, rows, D]`` boxes."""
    if not use_tma:
        return x
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor(x, list(x.shape), list(x.stride()), [1, 1, rows, x.shape[-1]])


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _group_args(index) -> tuple[int, int]:
    return index.group_strides()


def _kpm_arg(key_padding_mask: torch.Tensor | None, like: torch.Tensor) -> tuple[torch.Tensor, int]:
    if key_padding_mask is None:
        return like, 0  # never read: HAS_KPM is False
    kpm = key_padding_mask.contiguous().view(torch.uint8)
    return kpm, kpm.stride(0)


def _ws(cfg: KernelConfig) -> bool:
    return cfg.warp_specialize and _WS_SUPPORTED


def block_sparse_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index,
    sched: torch.Tensor,
    *,
    block_size: int,
    scale: float,
    key_padding_mask: torch.Tensor | None = None,
    config: KernelConfig | None = None,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward pass: returns ``(out [B,H,N,D] in q's dtype, lse fp32 [B*H, Nb*block_size], log2 domain)``.

    ``out``, when given, is written in place (any strides with a unit last stride: e.g. a transposed view of a
    ``[B, N, H, D]`` buffer).
    """
    bsz, heads, n_ctx, head_dim = q.shape
    nb = index.num_blocks
    cfg = config or default_configs(head_dim, q.dtype, block_size)["fwd"]
    _check_config(cfg, block_size, "forward")
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((bsz * heads, nb * block_size), dtype=torch.float32, device=q.device)
    kpm, stride_kpm = _kpm_arg(key_padding_mask, sched)
    group_b, group_h = _group_args(index)
    grid = (sched.numel() * (block_size // cfg.block_m),)
    use_tma = cfg.tma and _tma_ok(k, v)
    _attn_fwd[grid](
        q, _streamed(k, cfg.block_n, use_tma), _streamed(v, cfg.block_n, use_tma), out, lse, kpm,
        index.kv_ptr, index.kv_idx, sched,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        stride_kpm,
        heads, n_ctx, nb, group_b, group_h, scale * LOG2E,
        HEAD_DIM=head_dim, BLOCK_SIZE=block_size, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        EVEN_N=n_ctx % block_size == 0, HAS_KPM=key_padding_mask is not None, PRECISION=_precision(q.dtype),
        USE_TMA=use_tma, FOLD=cfg.fold_scale and scale > 0, LAZY=cfg.lazy_rescale, WS=_ws(cfg),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out, lse


def block_sparse_backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    index,
    sched_rows: torch.Tensor,
    sched_cols: torch.Tensor,
    *,
    block_size: int,
    scale: float,
    key_padding_mask: torch.Tensor | None = None,
    need_dq: bool = True,
    need_dkdv: bool = True,
    dkdv_config: KernelConfig | None = None,
    dq_config: KernelConfig | None = None,
    grads_out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    deterministic: bool = True,
    single_pass_config: KernelConfig | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Backward pass: ``(dq, dk, dv)`` (``None`` where not requested), no N x N buffer anywhere.

    ``grads_out``, when given, are the ``(dq, dk, dv)`` buffers to write (unit last stride).

    Two kernels (dK/dV, then dQ; bit-reproducible) unless ``deterministic=False`` and a single-pass config is
    given or is in :func:`default_configs` (none is today): then one dK/dV pass also reduce-adds dQ with fp32
    atomics into a ``[B*H, Nb*block_size, D]`` buffer, scaled and cast afterwards.
    """
    bsz, heads, n_ctx, head_dim = q.shape
    nb = index.num_blocks
    n_pad = nb * block_size
    defaults = default_configs(head_dim, q.dtype, block_size)
    kpm, stride_kpm = _kpm_arg(key_padding_mask, sched_rows)
    group_b, group_h = _group_args(index)
    even = n_ctx % block_size == 0
    has_kpm = key_padding_mask is not None
    precision = _precision(q.dtype)
    if single_pass_config is not None and deterministic:
        raise ValueError("single_pass_config needs deterministic=False: the single-pass backward adds dQ with atomics")
    single = None if deterministic or not (need_dq and need_dkdv) else (single_pass_config or defaults.get("single_pass"))

    delta = torch.empty((bsz * heads, n_pad), dtype=torch.float32, device=q.device)
    pre_block = 64
    _attn_bwd_delta[(n_pad // pre_block, bsz * heads)](
        out, do, delta,
        out.stride(0), out.stride(1), out.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        heads, n_ctx, n_pad,
        HEAD_DIM=head_dim, BLOCK=pre_block, num_warps=4,
    )

    dq = dk = dv = None
    if need_dkdv:
        cfg = single or dkdv_config or defaults["dkdv"]
        _check_config(cfg, block_size, "single-pass" if single else "dK/dV")
        if grads_out is not None:
            dk, dv = grads_out[1], grads_out[2]
        else:
            dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
            dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
        grid = (sched_cols.numel() * (block_size // cfg.block_n),)
        use_tma = cfg.tma and _tma_ok(q, do)
        dq_mode = 0
        dq_acc = delta  # never read without DQ_MODE
        dq_arg = dq_acc
        if single is not None:
            dq_mode = DQ_REDUCE_MODES[cfg.dq_reduce]
            dq_acc = torch.zeros((bsz * heads, n_pad, head_dim), dtype=torch.float32, device=q.device)
            dq_arg = dq_acc
            if dq_mode == 3:
                if interpreting() or not _tma_ok(dq_acc):  # the interpreter has no descriptor reduce-add
                    dq_mode = 1
                else:
                    from triton.tools.tensor_descriptor import TensorDescriptor

                    dq_arg = TensorDescriptor(dq_acc, list(dq_acc.shape), list(dq_acc.stride()), [1, cfg.block_m, head_dim])
        _attn_bwd_dkdv[grid](
            _streamed(q, cfg.block_m, use_tma), k, v, _streamed(do, cfg.block_m, use_tma), dk, dv, lse, delta, kpm, dq_arg,
            index.q_ptr, index.q_idx, sched_cols,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            do.stride(0), do.stride(1), do.stride(2),
            dk.stride(0), dk.stride(1), dk.stride(2),
            dv.stride(0), dv.stride(1), dv.stride(2),
            stride_kpm,
            heads, n_ctx, nb, group_b, group_h, scale * LOG2E, scale,
            HEAD_DIM=head_dim, BLOCK_SIZE=block_size, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            EVEN_N=even, HAS_KPM=has_kpm, PRECISION=precision,
            USE_TMA=use_tma, DQ_MODE=dq_mode, WS=_ws(cfg), Q_MAJOR=cfg.q_major,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        if single is not None:
            dq = grads_out[0] if grads_out is not None else torch.empty(q.shape, dtype=q.dtype, device=q.device)
            dq.copy_(dq_acc.mul_(scale).view(bsz, heads, n_pad, head_dim)[:, :, :n_ctx])
            return dq, dk, dv
    if need_dq:
        cfg = dq_config or defaults["dq"]
        _check_config(cfg, block_size, "dQ")
        dq = grads_out[0] if grads_out is not None else torch.empty(q.shape, dtype=q.dtype, device=q.device)
        grid = (sched_rows.numel() * (block_size // cfg.block_m),)
        use_tma = cfg.tma and _tma_ok(k, v)
        _attn_bwd_dq[grid](
            q, _streamed(k, cfg.block_n, use_tma), _streamed(v, cfg.block_n, use_tma), do, dq, lse, delta, kpm,
            index.kv_ptr, index.kv_idx, sched_rows,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            do.stride(0), do.stride(1), do.stride(2),
            dq.stride(0), dq.stride(1), dq.stride(2),
            stride_kpm,
            heads, n_ctx, nb, group_b, group_h, scale * LOG2E, scale,
            HEAD_DIM=head_dim, BLOCK_SIZE=block_size, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            EVEN_N=even, HAS_KPM=has_kpm, PRECISION=precision,
            USE_TMA=use_tma, WS=_ws(cfg), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return dq, dk, dv
