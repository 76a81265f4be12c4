"""Attention over variable-length key ranges (the SVG2 kernel), Triton forward + backward.

The sequence is already permuted so that every query group (a query cluster) and
every key group (a key cluster) is a contiguous run of tokens.  A boolean map
``sel[bh, r, c]`` says which key groups the query group ``r`` attends; everything
else is derived from it by :func:`build_range_layout`:

- forward and dQ work on *query tiles*: at most ``tile_m`` consecutive rows of one
  query group (groups may span several tiles, the last tile of a group is partly
  filled).  Each query group owns a flat list of key *chunks* ``[start, end)`` of at
  most ``chunk_n`` keys: the union of its selected key groups, merged where they are
  adjacent in memory, then cut into kernel-sized pieces so the kernel runs one flat,
  pipelinable loop (the same list serves every tile of the group).
- dK/dV work on *key tiles* (at most ``tile_n`` rows of one key group) and walk the
  transposed lists: chunks of the query groups that selected that key group.
  No atomics, deterministic, no N x N buffer.

The forward stores the fp32 log2-domain LSE per row; rows that attend nothing get
zero output, zero gradients and an LSE of +inf (so recomputed probabilities are 0).
Tiles are launched longest-work first so the big groups do not form the tail.

The interpreter (``TRITON_INTERPRET=1``) runs the same kernels on CPU for tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..interpreter import interpreting

__all__ = ["RangeLayout", "build_range_layout", "SUPPORTED_HEAD_DIMS"]  # the differentiable call: sparse_attn.ops.range_attention

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
_LOG2E = 1.4426950408889634


def _configs() -> list:
    """Launch configs to autotune over on a GPU; one config under the interpreter (it cannot benchmark).

    Tuning reruns a kernel, which is safe: every kernel only stores (no accumulation into outputs).  The key has no
    sequence length, and ``cache_results=True`` keeps the winners in Triton's on-disk cache, so the sweep runs once
    per machine, not in every training run.
    """
    if interpreting():
        return [triton.Config({}, num_warps=4, num_stages=1)]
    return [triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (2, 3)]


_TUNE_KEY = ["HEAD_DIM", "BLOCK_M", "BLOCK_N", "PRECISION"]


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------
@triton.autotune(configs=_configs(), key=_TUNE_KEY, cache_results=True)
@triton.jit
def _range_attn_fwd(
    Q, K, V, O, LSE,
    tile_row, tile_start, tile_end, row_ptr, chunk_start, chunk_end,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
    H, N, rows_per_bh, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    row = tl.load(tile_row + pid)
    qs = tl.load(tile_start + pid)
    qe = tl.load(tile_end + pid)
    bh = row // rows_per_bh
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = qs + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_m = offs_m < qe
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd, mask=mask_m[:, None], other=0.0)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    c0 = tl.load(row_ptr + row)
    c1 = tl.load(row_ptr + row + 1)
    for c in range(c0, c1):
        ks = tl.load(chunk_start + c)
        ke = tl.load(chunk_end + c)
        cols = ks + offs_n
        mask_n = cols < ke
        k = tl.load(k_base + cols[:, None] * skn + offs_d[None, :] * skd, mask=mask_n[:, None], other=0.0)
        v = tl.load(v_base + cols[:, None] * svn + offs_d[None, :] * svd, mask=mask_n[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every chunk has >= 1 valid column
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.math.log2(tl.where(has, l_i, 1.0)), float("inf"))
    tl.store(O + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :] * sod, out.to(O.dtype.element_ty), mask=mask_m[:, None])
    tl.store(LSE + bh.to(tl.int64) * N + offs_m, lse, mask=mask_m)


# ----------------------------------------------------------------------------------------------
# Backward preprocess: delta = rowsum(dO * O) in fp32
# ----------------------------------------------------------------------------------------------
@triton.jit
def _range_attn_bwd_delta(
    O, DO, DELTA, sob, soh, son, sod, sdob, sdoh, sdon, sdod, H, N,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
):
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    mask = rows < N
    o = tl.load(O + b * sob + h * soh + rows[:, None] * son + offs_d[None, :] * sod, mask=mask[:, None], other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + rows[:, None] * sdon + offs_d[None, :] * sdod, mask=mask[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * N + rows, delta, mask=mask)


# ----------------------------------------------------------------------------------------------
# Backward: dQ (query tiles, forward lists)
# ----------------------------------------------------------------------------------------------
@triton.autotune(configs=_configs(), key=_TUNE_KEY, cache_results=True)
@triton.jit
def _range_attn_bwd_dq(
    Q, K, V, DO, DQ, LSE, DELTA,
    tile_row, tile_start, tile_end, row_ptr, chunk_start, chunk_end,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    sdob, sdoh, sdon, sdod, sdqb, sdqh, sdqn, sdqd,
    H, N, rows_per_bh, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    # grid axis 1 splits a query tile into BLOCK_M-row sub-tiles (fewer registers than the forward tile)
    pid = tl.program_id(0)
    row = tl.load(tile_row + pid)
    qs = tl.load(tile_start + pid) + tl.program_id(1) * BLOCK_M
    qe = tl.load(tile_end + pid)
    if qs < qe:
        bh = row // rows_per_bh
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        offs_m = qs + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        mask_m = offs_m < qe
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd, mask=mask_m[:, None], other=0.0)
        do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdon + offs_d[None, :] * sdod, mask=mask_m[:, None], other=0.0)
        lse = tl.load(LSE + bh.to(tl.int64) * N + offs_m, mask=mask_m, other=float("inf"))
        delta = tl.load(DELTA + bh.to(tl.int64) * N + offs_m, mask=mask_m, other=0.0)
        k_base = K + b * skb + h * skh
        v_base = V + b * svb + h * svh

        dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        c0 = tl.load(row_ptr + row)
        c1 = tl.load(row_ptr + row + 1)
        for c in range(c0, c1):
            ks = tl.load(chunk_start + c)
            ke = tl.load(chunk_end + c)
            cols = ks + offs_n
            mask_n = cols < ke
            k = tl.load(k_base + cols[:, None] * skn + offs_d[None, :] * skd, mask=mask_n[:, None], other=0.0)
            v = tl.load(v_base + cols[:, None] * svn + offs_d[None, :] * svd, mask=mask_n[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            p = tl.math.exp2(s - lse[:, None])
            p = tl.where(mask_n[None, :], p, 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        dq = dq * sm_scale
        tl.store(DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqn + offs_d[None, :] * sdqd, dq.to(DQ.dtype.element_ty), mask=mask_m[:, None])


# ----------------------------------------------------------------------------------------------
# Backward: dK, dV (key tiles, transposed lists)
# ----------------------------------------------------------------------------------------------
@triton.autotune(configs=_configs(), key=_TUNE_KEY, cache_results=True)
@triton.jit
def _range_attn_bwd_dkdv(
    Q, K, V, DO, DK, DV, LSE, DELTA,
    tile_row, tile_start, tile_end, row_ptr, chunk_start, chunk_end,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    sdob, sdoh, sdon, sdod, sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd,
    H, N, rows_per_bh, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    row = tl.load(tile_row + pid)
    ks = tl.load(tile_start + pid)
    ke = tl.load(tile_end + pid)
    bh = row // rows_per_bh
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_n = ks + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_n = offs_n < ke
    k = tl.load(K + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=mask_n[:, None], other=0.0)
    v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=mask_n[:, None], other=0.0)
    q_base = Q + b * sqb + h * sqh
    do_base = DO + b * sdob + h * sdoh
    lse_base = LSE + bh.to(tl.int64) * N
    delta_base = DELTA + bh.to(tl.int64) * N

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    c0 = tl.load(row_ptr + row)
    c1 = tl.load(row_ptr + row + 1)
    for c in range(c0, c1):
        qs = tl.load(chunk_start + c)
        qe = tl.load(chunk_end + c)
        rows = qs + offs_m
        mask_m = rows < qe
        q = tl.load(q_base + rows[:, None] * sqn + offs_d[None, :] * sqd, mask=mask_m[:, None], other=0.0)
        do = tl.load(do_base + rows[:, None] * sdon + offs_d[None, :] * sdod, mask=mask_m[:, None], other=0.0)
        lse = tl.load(lse_base + rows, mask=mask_m, other=float("inf"))
        delta = tl.load(delta_base + rows, mask=mask_m, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # [BLOCK_N, BLOCK_M]
        p_t = tl.math.exp2(s_t - lse[None, :])
        p_t = tl.where(mask_n[:, None] & mask_m[None, :], p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
    dk = dk * sm_scale
    tl.store(DK + b * sdkb + h * sdkh + offs_n[:, None] * sdkn + offs_d[None, :] * sdkd, dk.to(DK.dtype.element_ty), mask=mask_n[:, None])
    tl.store(DV + b * sdvb + h * sdvh + offs_n[:, None] * sdvn + offs_d[None, :] * sdvd, dv.to(DV.dtype.element_ty), mask=mask_n[:, None])


# ----------------------------------------------------------------------------------------------
# Layout: group map -> tiles and chunk lists
# ----------------------------------------------------------------------------------------------
@dataclass
class RangeLayout:
    """Everything the kernels need, derived from a group map (see module docstring).

    Positions are token indices inside one (batch, head) sequence of the permuted layout.
    ``q_*`` drive the forward and dQ passes, ``k_*`` the dK/dV pass.  ``q_range_*`` keep
    the merged (unsplit) key ranges per query group for the pure-torch path and stats.
    """

    batch_heads: int
    rows_per_bh: int  # query groups per (b, h)
    cols_per_bh: int  # key groups per (b, h)
    tile_m: int
    tile_n: int
    chunk_m: int
    chunk_n: int
    dq_block_m: int  # rows per dQ program (a query tile is split into tile_m // dq_block_m of them)
    row_sizes: Tensor  # int64 [BH, R]
    row_offsets: Tensor  # int64 [BH, R]
    col_sizes: Tensor  # int64 [BH, C]
    col_offsets: Tensor  # int64 [BH, C]
    q_tile_row: Tensor  # int32 [Tq], global query-group id bh * R + r
    q_tile_start: Tensor
    q_tile_end: Tensor
    q_row_ptr: Tensor  # int32 [BH*R + 1] into q_chunk_*
    q_chunk_start: Tensor
    q_chunk_end: Tensor
    q_range_ptr: Tensor  # int64 [BH*R + 1] into q_range_*
    q_range_start: Tensor
    q_range_end: Tensor
    k_tile_row: Tensor  # int32 [Tk], global key-group id bh * C + c
    k_tile_start: Tensor
    k_tile_end: Tensor
    k_row_ptr: Tensor  # int32 [BH*C + 1] into k_chunk_*
    k_chunk_start: Tensor
    k_chunk_end: Tensor

    @property
    def num_pairs(self) -> Tensor:
        """Attended (query, key) pairs per (b, h): int64 [BH]."""
        lens = self.q_range_end - self.q_range_start
        rows = torch.repeat_interleave(
            torch.arange(self.batch_heads * self.rows_per_bh, device=lens.device), self.q_range_ptr.diff()
        )
        per_row = torch.zeros(self.batch_heads * self.rows_per_bh, dtype=torch.long, device=lens.device)
        per_row.index_add_(0, rows, lens)
        return (per_row.view(self.batch_heads, self.rows_per_bh) * self.row_sizes).sum(-1)


def _exclusive_cumsum(x: Tensor, dim: int = -1) -> Tensor:
    return torch.cumsum(x, dim) - x


def _merged_ranges(m: Tensor, sizes: Tensor, offsets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per row of ``m [BH, R, C]``: maximal runs of selected column groups as [start, end) token ranges.

    Empty column groups do not break a run (they occupy no tokens), zero-length runs are dropped.
    Returns (row id bh*R + r, start, end), sorted by row then start.
    """
    bh_n, r_n, c_n = m.shape
    empty = (sizes == 0)[:, None, :]
    run = m | empty
    prev = torch.zeros_like(run)
    prev[..., 1:] = run[..., :-1]
    nxt = torch.zeros_like(run)
    nxt[..., :-1] = run[..., 1:]
    b_s, r_s, c_s = (run & ~prev).nonzero(as_tuple=True)
    b_e, _, c_e = (run & ~nxt).nonzero(as_tuple=True)
    start = offsets[b_s, c_s]
    end = offsets[b_e, c_e] + sizes[b_e, c_e]
    keep = end > start
    return (b_s * r_n + r_s)[keep], start[keep], end[keep]


def _split(row: Tensor, start: Tensor, end: Tensor, piece: int) -> tuple[Tensor, Tensor, Tensor]:
    """Cut every [start, end) into consecutive pieces of at most ``piece`` tokens (order kept)."""
    n_pieces = (end - start + piece - 1) // piece
    idx = torch.repeat_interleave(torch.arange(row.numel(), device=row.device), n_pieces)
    first = _exclusive_cumsum(n_pieces)
    local = torch.arange(idx.numel(), device=row.device) - first[idx]
    s = start[idx] + local * piece
    return row[idx], s, torch.minimum(s + piece, end[idx])


def _row_ptr(row: Tensor, num_rows: int) -> Tensor:
    counts = torch.bincount(row, minlength=num_rows)
    ptr = torch.zeros(num_rows + 1, dtype=torch.long, device=row.device)
    ptr[1:] = torch.cumsum(counts, 0)
    return ptr


def _tiles(sizes: Tensor, offsets: Tensor, tile: int, work: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Tiles of every group (longest ``work`` first): (group id, start, end)."""
    gid = torch.arange(sizes.numel(), device=sizes.device)
    row, start, end = _split(gid, offsets.reshape(-1), (offsets + sizes).reshape(-1), tile)
    order = torch.argsort(work[row], descending=True, stable=True)
    return row[order], start[order], end[order]


def build_range_layout(
    sel: Tensor,
    row_sizes: Tensor,
    col_sizes: Tensor,
    *,
    tile_m: int = 128,
    tile_n: int = 128,
    chunk_m: int = 64,
    chunk_n: int = 64,
    dq_block_m: int | None = None,
) -> RangeLayout:
    """Build the kernel layout from a group map.

    sel: bool [BH, R, C], query group r attends key group c.
    row_sizes: [BH, R] tokens per query group, laid out consecutively from position 0.
    col_sizes: [BH, C] tokens per key group, likewise.
    Tokens past the last group receive zero output / zero gradients.
    tile_m: query rows per forward program; dq_block_m (default min(64, tile_m)) per dQ program.
    tile_n: keys per dK/dV program; chunk_n / chunk_m: keys / queries per inner-loop step.
    """
    if sel.dim() != 3 or sel.dtype != torch.bool:
        raise ValueError(f"sel: expected a bool [BH, R, C] tensor, got {sel.dtype} {tuple(sel.shape)}")
    bh_n, r_n, c_n = sel.shape
    if tuple(row_sizes.shape) != (bh_n, r_n) or tuple(col_sizes.shape) != (bh_n, c_n):
        raise ValueError(
            f"row_sizes/col_sizes: expected shapes {(bh_n, r_n)} and {(bh_n, c_n)}, "
            f"got {tuple(row_sizes.shape)} and {tuple(col_sizes.shape)}"
        )
    if dq_block_m is None:
        dq_block_m = min(64, tile_m)
    sizes = (("tile_m", tile_m), ("tile_n", tile_n), ("chunk_m", chunk_m), ("chunk_n", chunk_n), ("dq_block_m", dq_block_m))
    for name, val in sizes:
        if not isinstance(val, int) or val < 16 or val & (val - 1):
            raise ValueError(f"{name}: expected a power of two >= 16, got {val}")
    if dq_block_m > tile_m:
        raise ValueError(f"dq_block_m: expected <= tile_m={tile_m}, got {dq_block_m}")
    row_sizes = row_sizes.long()
    col_sizes = col_sizes.long()
    row_off = _exclusive_cumsum(row_sizes)
    col_off = _exclusive_cumsum(col_sizes)

    # query-major: key ranges per query group
    q_row, q_rs, q_re = _merged_ranges(sel, col_sizes, col_off)
    q_range_ptr = _row_ptr(q_row, bh_n * r_n)
    q_work = torch.zeros(bh_n * r_n, dtype=torch.long, device=sel.device).index_add_(0, q_row, q_re - q_rs)
    qc_row, qc_s, qc_e = _split(q_row, q_rs, q_re, chunk_n)
    qt_row, qt_s, qt_e = _tiles(row_sizes, row_off, tile_m, q_work)

    # key-major: query ranges per key group (transposed map)
    k_row, k_rs, k_re = _merged_ranges(sel.transpose(1, 2), row_sizes, row_off)
    k_work = torch.zeros(bh_n * c_n, dtype=torch.long, device=sel.device).index_add_(0, k_row, k_re - k_rs)
    kc_row, kc_s, kc_e = _split(k_row, k_rs, k_re, chunk_m)
    kt_row, kt_s, kt_e = _tiles(col_sizes, col_off, tile_n, k_work)

    i32 = torch.int32
    return RangeLayout(
        batch_heads=bh_n, rows_per_bh=r_n, cols_per_bh=c_n,
        tile_m=tile_m, tile_n=tile_n, chunk_m=chunk_m, chunk_n=chunk_n, dq_block_m=dq_block_m,
        row_sizes=row_sizes, row_offsets=row_off, col_sizes=col_sizes, col_offsets=col_off,
        q_tile_row=qt_row.to(i32), q_tile_start=qt_s.to(i32), q_tile_end=qt_e.to(i32),
        q_row_ptr=_row_ptr(qc_row, bh_n * r_n).to(i32), q_chunk_start=qc_s.to(i32), q_chunk_end=qc_e.to(i32),
        q_range_ptr=q_range_ptr, q_range_start=q_rs, q_range_end=q_re,
        k_tile_row=kt_row.to(i32), k_tile_start=kt_s.to(i32), k_tile_end=kt_e.to(i32),
        k_row_ptr=_row_ptr(kc_row, bh_n * c_n).to(i32), k_chunk_start=kc_s.to(i32), k_chunk_end=kc_e.to(i32),
    )


# ----------------------------------------------------------------------------------------------
# Launch wrappers (autograd: the custom ops sparse_attn::range_attn_fwd / _bwd in sparse_attn/ops.py)
# ----------------------------------------------------------------------------------------------
def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _forward(q: Tensor, k: Tensor, v: Tensor, lay: RangeLayout, scale: float) -> tuple[Tensor, Tensor]:
    b, h, n, d = q.shape
    o = torch.zeros_like(q)
    lse = torch.full((b * h, n), float("inf"), dtype=torch.float32, device=q.device)
    grid = (lay.q_tile_row.numel(),)
    if grid[0]:
        _range_attn_fwd[grid](
            q, k, v, o, lse,
            lay.q_tile_row, lay.q_tile_start, lay.q_tile_end, lay.q_row_ptr, lay.q_chunk_start, lay.q_chunk_end,
            *q.stride(), *k.stride(), *v.stride(), *o.stride(),
            h, n, lay.rows_per_bh, scale * _LOG2E,
            HEAD_DIM=d, BLOCK_M=lay.tile_m, BLOCK_N=lay.chunk_n, PRECISION=_precision(q.dtype),
        )
    return o, lse


def _backward(q, k, v, o, lse, do, lay: RangeLayout, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    b, h, n, d = q.shape
    delta = torch.empty(b * h, n, dtype=torch.float32, device=q.device)
    _range_attn_bwd_delta[(triton.cdiv(n, 64), b * h)](
        o, do, delta, *o.stride(), *do.stride(), h, n, HEAD_DIM=d, BLOCK=64,
    )
    dq = torch.zeros_like(q)
    dk = torch.zeros_like(k)
    dv = torch.zeros_like(v)
    prec = _precision(q.dtype)
    if lay.q_tile_row.numel():
        _range_attn_bwd_dq[(lay.q_tile_row.numel(), lay.tile_m // lay.dq_block_m)](
            q, k, v, do, dq, lse, delta,
            lay.q_tile_row, lay.q_tile_start, lay.q_tile_end, lay.q_row_ptr, lay.q_chunk_start, lay.q_chunk_end,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
            h, n, lay.rows_per_bh, scale * _LOG2E, scale,
            HEAD_DIM=d, BLOCK_M=lay.dq_block_m, BLOCK_N=lay.chunk_n, PRECISION=prec,
        )
    if lay.k_tile_row.numel():
        _range_attn_bwd_dkdv[(lay.k_tile_row.numel(),)](
            q, k, v, do, dk, dv, lse, delta,
            lay.k_tile_row, lay.k_tile_start, lay.k_tile_end, lay.k_row_ptr, lay.k_chunk_start, lay.k_chunk_end,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
            h, n, lay.cols_per_bh, scale * _LOG2E, scale,
            HEAD_DIM=d, BLOCK_N=lay.tile_n, BLOCK_M=lay.chunk_m, PRECISION=prec,
        )
    return dq, dk, dv


def check_inputs(q: Tensor, k: Tensor, v: Tensor, layout: RangeLayout) -> None:
    """Raise ValueError unless q/k/v fit the Triton kernels and ``layout``."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise ValueError(f"{name}: expected a [B, H, N, D] tensor")
        if t.shape != q.shape or t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{name}: expected shape/dtype/device of q {tuple(q.shape)} {q.dtype} {q.device}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q: the Triton range kernel supports fp16/bf16/fp32, got {q.dtype}")
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"q: the Triton range kernel supports head dims {SUPPORTED_HEAD_DIMS}, got {q.shape[-1]}")
    b, h, n, _ = q.shape
    if layout.batch_heads != b * h:
        raise ValueError(f"layout: built for {layout.batch_heads} (batch*head) sequences, q has {b * h}")
    if int(layout.row_sizes.sum(-1).max()) > n or int(layout.col_sizes.sum(-1).max()) > n:
        raise ValueError(f"layout: groups cover more than the sequence length N={n}")
