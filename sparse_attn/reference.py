"""Pure-PyTorch block-sparse attention: the CPU path and the second oracle for the Triton kernels.

Never materialises the N x N score matrix: query blocks are processed in chunks, and each chunk gathers
only its kept key/value blocks (``[rows, max kept blocks, block, D]``) before a masked softmax.  The forward
returns the log-sum-exp and the backward is explicit (it runs inside the ``sparse_attn`` custom ops, where
autograd cannot), so memory stays at one chunk's scores instead of the whole sparse score matrix.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["block_sparse_forward_torch", "block_sparse_backward_torch"]

# Elements of one chunk's score tensor (fp32: 4 bytes each); bounds the working memory of the torch path.
_CHUNK_ELEMENTS = 1 << 25


def _blocked(x: torch.Tensor, n_pad: int, block_size: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, H, N, D] -> [B, H, Nb, block, D] in ``dtype``, zero-padded at the tail."""
    b, h, n, d = x.shape
    x = x.to(dtype)
    if n_pad != n:
        x = F.pad(x, (0, 0, 0, n_pad - n))
    return x.reshape(b, h, n_pad // block_size, block_size, d)


def _prepare(q, k, v, block_mask, block_size, key_padding_mask):
    b, h, n, d = q.shape
    nb = math.ceil(n / block_size)
    n_pad = nb * block_size
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    blocks = [_blocked(x, n_pad, block_size, dtype) for x in (q, k, v)]
    mask = block_mask.expand(b, h, nb, nb)
    key_valid = torch.arange(n_pad, device=q.device) < n
    if key_padding_mask is not None:
        key_valid = key_valid[None, :] & F.pad(key_padding_mask, (0, n_pad - n), value=False)
    key_valid = key_valid.reshape(-1, nb, block_size)
    count_max = int(mask.sum(-1).max()) if mask.numel() else 0
    rows = max(1, _CHUNK_ELEMENTS // max(1, b * h * block_size * block_size * count_max))
    chunks = [(r0, min(nb, r0 + rows)) for r0 in range(0, nb, rows)]
    return blocks, mask, key_valid, chunks, dtype


def _gather(mask_chunk, key_valid, b, h):
    """Kept key blocks of each query block, ascending, padded to the chunk's longest row: (order, ok, count)."""
    count = mask_chunk.sum(-1)
    c = int(count.max())
    order = torch.argsort((~mask_chunk).to(torch.uint8), dim=-1, stable=True)[..., :c]  # [B, H, R, c]
    blk_ok = torch.arange(c, device=order.device) < count[..., None]
    bi = torch.arange(b, device=order.device).view(b, 1, 1, 1)
    hi = torch.arange(h, device=order.device).view(1, h, 1, 1)
    kb_sel = bi if key_valid.shape[0] == b else torch.zeros_like(bi)
    ok = key_valid[kb_sel, order] & blk_ok[..., None]  # [B, H, R, c, bs]
    return order, ok, c, bi, hi


def _chunk_ok(ok, groups, order, r0, r1, bi, hi, block_size):
    """Allowed (query, key) pairs of a chunk: ``[B, H, R, 1 or bs, c*bs]``.

    ``groups = (partial [Bm,Hm,Nb,Nb], q_groups [B,H,Nb*bs], k_groups [B,H,Nb*bs], pairs [B,H,Rq,Rk])``: in the
    blocks marked partial, query ``i`` sees key ``j`` only if ``pairs[b, h, q_groups[i], k_groups[j]]``.
    """
    b, h, r, c, bs = ok.shape
    if groups is None:
        return ok.reshape(b, h, r, 1, c * bs)
    partial, q_groups, k_groups, pairs = groups
    nb = q_groups.shape[-1] // bs
    rq, rk = pairs.shape[-2:]
    qg = q_groups.view(b, h, nb, bs)[:, :, r0:r1].long()  # [B, H, R, bs]
    kg = k_groups.view(b, h, nb, bs)[bi, hi, order].long()  # [B, H, R, c, bs]
    part = partial.expand(b, h, nb, nb)[:, :, r0:r1].gather(-1, order)  # [B, H, R, c]
    flat = (qg[..., :, None, None] * rk + kg[..., None, :, :]).reshape(b, h, -1)  # [B, H, R*bs*c*bs]
    pair_ok = pairs.reshape(b, h, rq * rk).gather(-1, flat).view(b, h, r, bs, c, bs)
    pair_ok = pair_ok | ~part[:, :, :, None, :, None]
    return (pair_ok & ok[:, :, :, None]).reshape(b, h, r, bs, c * bs)


def block_sparse_forward_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    *,
    block_size: int,
    scale: float,
    key_padding_mask: torch.Tensor | None = None,
    groups: tuple | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B,H,N,D] in q's dtype, lse [B,H,Nb*block_size])``: natural-log LSE of the scaled scores,
    ``-inf`` on rows without a valid key; fp64 for fp64 inputs, fp32 otherwise.  No autograd.
    ``groups``: optional token-level mask inside partial blocks (see :func:`_chunk_ok`)."""
    b, h, n, d = q.shape
    (qb, kb, vb), mask, key_valid, chunks, dtype = _prepare(q, k, v, block_mask, block_size, key_padding_mask)
    nb = mask.shape[-1]
    out = torch.zeros(b, h, nb, block_size, d, dtype=dtype, device=q.device)
    lse = torch.full((b, h, nb, block_size), float("-inf"), dtype=dtype, device=q.device)
    for r0, r1 in chunks:
        mask_chunk = mask[:, :, r0:r1]
        if not bool(mask_chunk.any()):
            continue
        order, ok, c, bi, hi = _gather(mask_chunk, key_valid, b, h)
        r = r1 - r0
        kg, vg = kb[bi, hi, order], vb[bi, hi, order]  # [B, H, R, c, bs, D]
        s = torch.einsum("bhrqd,bhrckd->bhrqck", qb[:, :, r0:r1], kg).reshape(b, h, r, block_size, c * block_size) * scale
        s = s.masked_fill(~_chunk_ok(ok, groups, order, r0, r1, bi, hi, block_size), float("-inf"))
        m = s.amax(dim=-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        p = torch.exp(s - m)
        denom = p.sum(dim=-1, keepdim=True)
        o = torch.einsum("bhrqk,bhrkd->bhrqd", p, vg.reshape(b, h, r, c * block_size, d))
        out[:, :, r0:r1] = o / torch.where(denom == 0, torch.ones_like(denom), denom)
        lse[:, :, r0:r1] = (m + torch.log(denom)).squeeze(-1)  # log(0) = -inf on empty rows
    return out.reshape(b, h, nb * block_size, d)[:, :, :n].to(q.dtype), lse.reshape(b, h, nb * block_size)


def block_sparse_backward_torch(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    block_mask: torch.Tensor,
    *,
    block_size: int,
    scale: float,
    key_padding_mask: torch.Tensor | None = None,
    groups: tuple | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` in the inputs' dtype from the forward's ``out`` and ``lse``.  No autograd."""
    b, h, n, d = q.shape
    (qb, kb, vb), mask, key_valid, chunks, dtype = _prepare(q, k, v, block_mask, block_size, key_padding_mask)
    nb = mask.shape[-1]
    n_pad = nb * block_size
    dob = _blocked(do, n_pad, block_size, dtype)
    delta = (dob * _blocked(out, n_pad, block_size, dtype)).sum(-1)  # [B, H, Nb, bs]
    lse_b = lse.to(dtype).reshape(b, h, nb, block_size)
    dq = torch.zeros_like(qb)
    dk = torch.zeros_like(kb)
    dv = torch.zeros_like(vb)
    for r0, r1 in chunks:
        mask_chunk = mask[:, :, r0:r1]
        if not bool(mask_chunk.any()):
            continue
        order, ok, c, bi, hi = _gather(mask_chunk, key_valid, b, h)
        r = r1 - r0
        kg, vg = kb[bi, hi, order], vb[bi, hi, order]  # [B, H, R, c, bs, D]
        q_c, do_c = qb[:, :, r0:r1], dob[:, :, r0:r1]
        s = torch.einsum("bhrqd,bhrckd->bhrqck", q_c, kg).reshape(b, h, r, block_size, c * block_size) * scale
        row_lse = lse_b[:, :, r0:r1, :, None]
        live = _chunk_ok(ok, groups, order, r0, r1, bi, hi, block_size) & torch.isfinite(row_lse)
        p = torch.where(live, torch.exp(s - torch.where(torch.isfinite(row_lse), row_lse, torch.zeros_like(row_lse))), 0.0)
        dp = torch.einsum("bhrqd,bhrkd->bhrqk", do_c, vg.reshape(b, h, r, c * block_size, d))
        ds = p * (dp - delta[:, :, r0:r1, :, None])
        dq[:, :, r0:r1] = torch.einsum("bhrqk,bhrkd->bhrqd", ds, kg.reshape(b, h, r, c * block_size, d)) * scale
        dk_g = torch.einsum("bhrqk,bhrqd->bhrkd", ds, q_c).reshape(b, h, r, c, block_size, d) * scale
        dv_g = torch.einsum("bhrqk,bhrqd->bhrkd", p, do_c).reshape(b, h, r, c, block_size, d)
        idx = (bi.expand_as(order), hi.expand_as(order), order)
        dk.index_put_(idx, dk_g, accumulate=True)  # padding slots carry p = 0: they add nothing
        dv.index_put_(idx, dv_g, accumulate=True)

    def unblock(x, like):
        return x.reshape(b, h, n_pad, d)[:, :, :n].to(like.dtype)

    return unblock(dq, q), unblock(dk, k), unblock(dv, v)
