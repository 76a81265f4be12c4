"""Block-sparse attention as ``torch.library`` custom ops: opaque to ``torch.compile``, visible to checkpointing.

Two ops, one per pass, so that the compiler never traces into a kernel launch (no graph break) and a
selective-activation-checkpoint policy can name the forward and keep its outputs instead of re-running it:

* ``sparse_attn::block_sparse_fwd(q, k, v, block_mask, key_padding_mask, block_size, scale, backend, layout,
  deterministic) -> (out, lse)``
* ``sparse_attn::block_sparse_bwd(grad_out, q, k, v, out, lse, block_mask, key_padding_mask, ...) -> (dq, dk, dv)``
* ``sparse_attn::range_attn_fwd`` / ``range_attn_bwd``: SVG2's Triton range kernel, the same way.

The forward's autograd formula calls the backward op.  Everything an op takes is a tensor or a plain int /
float / str / bool: the block mask itself is an input and its sparse index (``indices.block_index``) is looked
up inside the implementation, where its cache on the mask tensor's identity keeps working.

``lse`` is backend-specific (Triton: log2 domain ``[B*H, Nb*block_size]``; torch: natural log, same shape;
FA4: natural log ``[B, H, N]``) and only ever handed back to the same backend's backward.

``q``/``k``/``v`` come in ``layout`` (``"bhnd"`` = ``[B, H, N, D]`` or ``"bnhd"`` = ``[B, N, H, D]``); ``out`` and the
gradients are allocated contiguous in that same layout, so callers holding ``[B, N, H, D]`` never copy.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    from .kernels.range_attention import RangeLayout

__all__ = ["CHECKPOINT_SAVE_OPS", "block_sparse_fwd", "block_sparse_bwd", "range_attn_fwd", "range_attn_bwd", "range_attention", "LAYOUTS"]

LAYOUTS = ("bhnd", "bnhd")

#: Calls of the forward implementation so far (tests use it to see that checkpoint recomputation skips it).
forward_calls = 0


def _bhnd(x: Tensor, layout: str) -> Tensor:
    """A ``[B, H, N, D]`` view of a tensor held in ``layout`` (no copy)."""
    return x if layout == "bhnd" else x.transpose(1, 2)


def _as_4d(block_mask: Tensor) -> Tensor:
    """``[Bm, Hm, Nb, Nb]`` view; a 4-D mask is returned as is (its identity keys the FA4 list cache)."""
    if block_mask.dim() == 4:
        return block_mask
    return block_mask.reshape((1,) * (4 - block_mask.dim()) + tuple(block_mask.shape))


def _lse_meta(q: Tensor, block_size: int, backend: str, layout: str) -> tuple[tuple, torch.dtype]:
    b, h, n, _ = _bhnd(q, layout).shape
    if backend == "fa4":
        return (b, h, n), torch.float32
    nb = (n + block_size - 1) // block_size
    dtype = torch.float64 if backend == "torch" and q.dtype == torch.float64 else torch.float32
    return (b * h, nb * block_size), dtype


def _groups(partial_mask, q_groups, k_groups, group_pairs) -> tuple | None:
    if partial_mask is None:
        return None
    return (_as_4d(partial_mask), q_groups, k_groups, group_pairs)


def _no_groups(partial_mask: Optional[Tensor], backend: str) -> None:
    if partial_mask is not None:
        raise ValueError(f"sparse_attn::block_sparse_*: token groups (partial blocks) need backend 'torch' or 'fa4', "
                         f"not {backend!r}")


def _unit_stride(x: Tensor) -> Tensor:
    """The kernels index the head dim with stride 1; any other layout is kept as is."""
    return x if x.stride(-1) == 1 else x.contiguous()


@torch.library.custom_op("sparse_attn::block_sparse_fwd", mutates_args=())
def block_sparse_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_mask: Tensor,
    key_padding_mask: Optional[Tensor],
    partial_mask: Optional[Tensor],
    q_groups: Optional[Tensor],
    k_groups: Optional[Tensor],
    group_pairs: Optional[Tensor],
    block_size: int,
    scale: float,
    backend: str,
    layout: str,
    deterministic: bool,
) -> tuple[Tensor, Tensor]:
    """Forward of validated inputs on a resolved backend (``"triton"``, ``"torch"`` or ``"fa4"``).

    ``partial_mask``/``q_groups``/``k_groups``/``group_pairs`` (all or none; torch and fa4 backends): inside the
    blocks marked in ``partial_mask`` (bool, shaped like ``block_mask``) query ``i`` sees key ``j`` only if
    ``group_pairs[b, h, q_groups[b, h, i], k_groups[b, h, j]]`` (int32 ``[B, H, Nb*block_size]`` group ids,
    bool ``[B, H, Rq, Rk]``; positions past ``N`` must carry a group whose pairs are all False).  This is how
    SVG2 cluster pairs run on the block-sparse kernels.
    """
    global forward_calls
    forward_calls += 1
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # contiguous in the caller's layout
    q4, k4, v4, out4 = (_bhnd(x, layout) for x in (q, k, v, out))
    if backend == "torch":
        from .reference import block_sparse_forward_torch

        o, lse = block_sparse_forward_torch(
            q4, k4, v4, _as_4d(block_mask), block_size=block_size, scale=scale, key_padding_mask=key_padding_mask,
            groups=_groups(partial_mask, q_groups, k_groups, group_pairs),
        )
        out4.copy_(o)
        return out, lse.reshape(lse.shape[0] * lse.shape[1], -1)
    if backend == "triton":
        from .indices import block_index
        from .kernels.block_sparse import block_sparse_forward

        _no_groups(partial_mask, backend)
        index = block_index(block_mask)
        bsz, heads = q4.shape[:2]
        sched = index.schedule(bsz, heads, transposed=False, mode="lpt")
        _, lse = block_sparse_forward(
            _unit_stride(q4), _unit_stride(k4), _unit_stride(v4), index, sched,
            block_size=block_size, scale=scale, key_padding_mask=key_padding_mask, out=out4,
        )
        return out, lse
    if backend == "fa4":
        from .backends import fa4

        lse = fa4.forward(q, k, v, block_mask, key_padding_mask, _groups(partial_mask, q_groups, k_groups, group_pairs),
                          block_size, scale, layout, out)
        return out, lse
    raise ValueError(f"sparse_attn::block_sparse_fwd: unknown backend {backend!r}")


@block_sparse_fwd.register_fake
def _(q, k, v, block_mask, key_padding_mask, partial_mask, q_groups, k_groups, group_pairs, block_size, scale, backend,
      layout, deterministic):
    shape, dtype = _lse_meta(q, block_size, backend, layout)
    return torch.empty(q.shape, dtype=q.dtype, device=q.device), q.new_empty(shape, dtype=dtype)


@torch.library.custom_op("sparse_attn::block_sparse_bwd", mutates_args=())
def block_sparse_bwd(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    block_mask: Tensor,
    key_padding_mask: Optional[Tensor],
    partial_mask: Optional[Tensor],
    q_groups: Optional[Tensor],
    k_groups: Optional[Tensor],
    group_pairs: Optional[Tensor],
    block_size: int,
    scale: float,
    backend: str,
    layout: str,
    deterministic: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)``, contiguous in ``layout``, from the forward's ``out`` and ``lse``."""
    grads = tuple(torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v))
    do4, q4, k4, v4, out4 = (_bhnd(x, layout) for x in (grad_out, q, k, v, out))
    g4 = tuple(_bhnd(g, layout) for g in grads)
    if backend == "torch":
        from .reference import block_sparse_backward_torch

        b, h = q4.shape[:2]
        res = block_sparse_backward_torch(
            do4, q4, k4, v4, out4, lse.reshape(b, h, -1), _as_4d(block_mask),
            block_size=block_size, scale=scale, key_padding_mask=key_padding_mask,
            groups=_groups(partial_mask, q_groups, k_groups, group_pairs),
        )
        for g, r in zip(g4, res):
            g.copy_(r)
        return grads
    if backend == "triton":
        from .indices import block_index
        from .kernels.block_sparse import block_sparse_backward

        _no_groups(partial_mask, backend)
        index = block_index(block_mask)
        bsz, heads = q4.shape[:2]
        block_sparse_backward(
            _unit_stride(do4), _unit_stride(q4), _unit_stride(k4), _unit_stride(v4), _unit_stride(out4), lse, index,
            index.schedule(bsz, heads, transposed=False, mode="lpt"),
            index.schedule(bsz, heads, transposed=True, mode="lpt"),
            block_size=block_size, scale=scale, key_padding_mask=key_padding_mask, grads_out=g4,
            deterministic=deterministic,
        )
        return grads
    if backend == "fa4":
        from .backends import fa4

        fa4.backward(grad_out, q, k, v, out, lse, block_mask, key_padding_mask,
                     _groups(partial_mask, q_groups, k_groups, group_pairs), block_size, scale, layout, deterministic,
                     grads)
        return grads
    raise ValueError(f"sparse_attn::block_sparse_bwd: unknown backend {backend!r}")


@block_sparse_bwd.register_fake
def _(grad_out, q, k, v, out, lse, block_mask, key_padding_mask, partial_mask, q_groups, k_groups, group_pairs,
      block_size, scale, backend, layout, deterministic):
    return tuple(torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v))


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, block_mask, key_padding_mask, partial_mask, q_groups, k_groups, group_pairs = inputs[:9]
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, block_mask, key_padding_mask, partial_mask, q_groups, k_groups, group_pairs)
    ctx.args = tuple(inputs[9:])
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out: Tensor, grad_lse: Tensor | None):
    q, k, v, out, lse, *masks = ctx.saved_tensors
    dq, dk, dv = block_sparse_bwd(grad_out, q, k, v, out, lse, *masks, *ctx.args)
    return (dq, dk, dv) + (None,) * 11


block_sparse_fwd.register_autograd(_backward, setup_context=_setup_context)

# ------------------------------------------------------------------------------------------ SVG2 range kernel
# RangeLayout (sparse_attn/kernels/range_attention.py) travels as its 12 launch tensors and 7 ints.

RANGE_TENSOR_FIELDS = ("q_tile_row", "q_tile_start", "q_tile_end", "q_row_ptr", "q_chunk_start", "q_chunk_end",
                       "k_tile_row", "k_tile_start", "k_tile_end", "k_row_ptr", "k_chunk_start", "k_chunk_end")
RANGE_INT_FIELDS = ("rows_per_bh", "cols_per_bh", "tile_m", "tile_n", "chunk_m", "chunk_n", "dq_block_m")


def _range_layout(tensors: list[Tensor], ints: list[int]):
    from types import SimpleNamespace

    return SimpleNamespace(**dict(zip(RANGE_TENSOR_FIELDS, tensors)), **dict(zip(RANGE_INT_FIELDS, ints)))


@torch.library.custom_op("sparse_attn::range_attn_fwd", mutates_args=())
def range_attn_fwd(q: Tensor, k: Tensor, v: Tensor, layout_tensors: list[Tensor], layout_ints: list[int],
                   scale: float) -> tuple[Tensor, Tensor]:
    """SVG2's Triton range-kernel forward: ``(out [B,H,N,D], lse fp32 [B*H, N])``."""
    from .kernels.range_attention import _forward

    global forward_calls
    forward_calls += 1
    return _forward(q, k, v, _range_layout(layout_tensors, layout_ints), scale)


@range_attn_fwd.register_fake
def _(q, k, v, layout_tensors, layout_ints, scale):
    b, h, n, _ = q.shape
    return torch.empty_like(q), q.new_empty((b * h, n), dtype=torch.float32)


@torch.library.custom_op("sparse_attn::range_attn_bwd", mutates_args=())
def range_attn_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                   layout_tensors: list[Tensor], layout_ints: list[int], scale: float) -> tuple[Tensor, Tensor, Tensor]:
    from .kernels.range_attention import _backward

    return _backward(q, k, v, out, lse, grad_out, _range_layout(layout_tensors, layout_ints), scale)


@range_attn_bwd.register_fake
def _(grad_out, q, k, v, out, lse, layout_tensors, layout_ints, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _range_setup_context(ctx, inputs, output) -> None:
    q, k, v, layout_tensors, layout_ints, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, *layout_tensors)
    ctx.args = (list(layout_ints), scale)
    ctx.mark_non_differentiable(lse)


def _range_backward(ctx, grad_out: Tensor, grad_lse: Tensor | None):
    q, k, v, out, lse, *layout_tensors = ctx.saved_tensors
    dq, dk, dv = range_attn_bwd(grad_out, q, k, v, out, lse, layout_tensors, *ctx.args)
    return dq, dk, dv, [None] * len(layout_tensors), None, None  # pytree of the inputs: one slot per list entry


range_attn_fwd.register_autograd(_range_backward, setup_context=_range_setup_context)

#: OpOverloads whose outputs a selective-activation-checkpoint policy should save (``CheckpointPolicy.MUST_SAVE``)
#: so that the recompute pass of ``torch.utils.checkpoint`` does not run attention a second time: the block-sparse
#: forward (radial; SVG2 on FA4) and SVG2's range-kernel forward.
CHECKPOINT_SAVE_OPS: tuple = (torch.ops.sparse_attn.block_sparse_fwd.default, torch.ops.sparse_attn.range_attn_fwd.default)


def range_attention(q: Tensor, k: Tensor, v: Tensor, layout: "RangeLayout", *, scale: float | None = None) -> Tensor:
    """Attention of ``q, k, v [B, H, N, D]`` (already permuted) restricted to ``layout``; differentiable.

    Rows that attend no key get zeros (and zero gradients).  ``scale`` defaults to 1/sqrt(D).
    """
    from .kernels.range_attention import check_inputs

    check_inputs(q, k, v, layout)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    tensors = [getattr(layout, f) for f in RANGE_TENSOR_FIELDS]
    ints = [int(getattr(layout, f)) for f in RANGE_INT_FIELDS]
    out, _ = range_attn_fwd(q, k, v, tensors, ints, float(scale))  # custom op: checkpoint policies see it
    return out
