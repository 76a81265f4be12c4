"""FlashAttention-4 (PyPI ``flash-attn-4``, CuTe DSL) as a block-sparse backend: support check, block lists, calls.

Our block mask becomes FA4's two per-row lists (``BlockSparseTensorsTorch``): *full* blocks, computed without any
mask, and *partial* blocks, where a ``mask_mod`` reading ``aux_tensors`` decides per (query, key) token:

* ``key_padding_mask``: key blocks with some invalid key are partial (``mask_mod`` reads the padded validity
  row); key blocks with no valid key are dropped from the lists altogether (so a row can become empty);
* token groups (SVG2 cluster pairs on the permuted sequence, see :mod:`sparse_attn.svg2`): the blocks the caller
  marks partial look up ``pairs[b, h, q_group, k_group]``.

Traps handled here (read in FA4 4.0.0b36's source, ``block_sparse_utils.py``): the forward walks each list from
its end and applies the sequence-length mask only to the first block it visits, so both lists are ascending
(the ragged tail block, the largest id, comes first); the other partial blocks get no length mask, so every
``aux_tensors`` row is padded to ``Nb * 128`` with "invalid" past ``N``.  The backward of FA4 does not support
``seqused_k`` together with block sparsity, hence the ``mask_mod`` route for padding.  The SM90 backward
accumulates dQ with atomics and has no deterministic block-sparse mode (4.0.0b36 asserts "Deterministic not
implemented for block-sparse backward"), so :func:`backward` refuses ``deterministic=True`` and
``block_sparse_attention`` never routes a deterministic call here.

The lists keep the full ``Nb`` width (no host sync to find the longest row) and are cached on the mask's
:class:`~sparse_attn.indices.BlockIndex`, keyed by the padding / partial-mask tensors they were built with.

Uses FA4's ``_flash_attn_fwd`` / ``_flash_attn_bwd`` (its autograd wrapper cannot run inside our custom op);
that is why the ``[fa4]`` extra pins one version.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch
from torch import Tensor

__all__ = ["unsupported_reason", "forward", "backward", "BLOCK_SIZE", "HEAD_DIMS", "DTYPES", "ARCHS"]

BLOCK_SIZE = 128
HEAD_DIMS = (64, 128)
DTYPES = (torch.float16, torch.bfloat16)
#: Compute-capability majors with FA4 block-sparse forward and backward (Hopper sm90, Blackwell sm100).
ARCHS = (9, 10)

_IMPORT: dict[str, Any] = {}
_ARCH: dict[int, tuple[int, int]] = {}
_MODS: dict[str, Any] = {}


def _import_error() -> Optional[str]:
    """Why flash-attn-4 cannot be imported, or None (a constant of the process for ``torch.compile``)."""
    return _fa4()[2]


def _fa4() -> tuple[Any, Any, Optional[str]]:
    """``(interface module, block_sparsity module, None)`` or ``(None, None, why not)``; imported once."""
    if not _IMPORT:
        # Compiled kernels persist on disk, so a new run does not pay the 5-10 s JIT per shape again.
        os.environ.setdefault("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "1")
        try:
            from flash_attn.cute import block_sparsity, interface

            _IMPORT.update(interface=interface, block_sparsity=block_sparsity, error=None)
        except Exception as exc:  # ImportError, or a CUDA/CUTLASS runtime that fails to load
            _IMPORT.update(interface=None, block_sparsity=None,
                           error=f"flash-attn-4 is not importable ({type(exc).__name__}: {exc}); pip install '.[fa4]'")
    return _IMPORT["interface"], _IMPORT["block_sparsity"], _IMPORT["error"]


def installed() -> bool:
    return _import_error() is None


def _capability(index: int) -> tuple[int, int]:
    if index not in _ARCH:
        _ARCH[index] = torch.cuda.get_device_capability(index)
    return _ARCH[index]


# Evaluated once at trace time by torch.compile (no graph break on the support check).
_import_error = torch.compiler.assume_constant_result(_import_error)
_capability = torch.compiler.assume_constant_result(_capability)


def unsupported_reason(q: Tensor, block_size: int) -> Optional[tuple[type, str]]:
    """Why FA4 cannot run this call (``q`` as ``[B, H, N, D]``) as ``(exception type, message)``, or None."""
    error = _import_error()
    if error is not None:
        return ImportError, error
    if not q.is_cuda:
        return ValueError, f"needs CUDA tensors, got device {q.device}"
    index = q.device.index if q.device.index is not None else torch.cuda.current_device()
    major, minor = _capability(index)
    if major not in ARCHS:
        return ValueError, f"needs an sm90 (Hopper) or sm100 (Blackwell) GPU, this one is sm{major}{minor}"
    if q.dtype not in DTYPES:
        return TypeError, f"supports q/k/v dtypes float16, bfloat16; got {q.dtype}"
    if q.shape[-1] not in HEAD_DIMS:
        return ValueError, f"supports head dim D in {HEAD_DIMS}, got D={q.shape[-1]}"
    if block_size != BLOCK_SIZE:
        return ValueError, f"supports block_size={BLOCK_SIZE} only, got {block_size}"
    return None


# ----------------------------------------------------------------------------------------------------- mask_mods


def _mask_mods() -> dict[str, Any]:
    """The CuTe ``mask_mod`` functions of :mod:`sparse_attn.backends.fa4_masks` (imported on first use)."""
    if not _MODS:
        from . import fa4_masks

        _MODS.update(key_valid=fa4_masks.key_valid, group_pair=fa4_masks.group_pair,
                     group_pair_key_valid=fa4_masks.group_pair_key_valid)
    return _MODS


# ----------------------------------------------------------------------------------------------------- block lists


def _lists(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row ascending column lists of a bool ``[Bm, Hm, R, C]``: (count int32 [Bm,Hm,R], idx int32 [Bm,Hm,R,C])."""
    cols = mask.shape[-1]
    ar = torch.arange(cols, device=mask.device, dtype=torch.int32)
    keyed = torch.where(mask, ar, cols)  # kept columns keep their id, the rest sort to the end
    idx = torch.sort(keyed, dim=-1).values
    idx = torch.where(idx == cols, 0, idx).to(torch.int32).contiguous()
    return mask.sum(-1, dtype=torch.int32).contiguous(), idx


def split_full_partial(
    block_mask: Tensor, key_padding_mask: Optional[Tensor], partial_mask: Optional[Tensor], n: int, block_size: int
) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """(full, partial) bool ``[Bm, Hm, Nb, Nb]`` and the int32 key-validity row ``[B, Nb*bs]`` (None without padding).

    Pure torch (tested on CPU): a kept block is partial when its key block holds an invalid key or the caller
    marked it partial; key blocks without any valid key are dropped.
    """
    mask = block_mask.reshape((1,) * (4 - block_mask.dim()) + tuple(block_mask.shape))
    nb = mask.shape[-1]
    partial = torch.zeros_like(mask)
    key_valid = None
    if key_padding_mask is not None:
        b = key_padding_mask.shape[0]
        valid = torch.nn.functional.pad(key_padding_mask, (0, nb * block_size - n), value=False)
        per_block = valid.view(b, nb, block_size)
        some_invalid = ~per_block.all(-1)  # includes the ragged tail: the mask_mod handles it exactly
        none_valid = ~per_block.any(-1)
        mask = mask & ~none_valid[:, None, None, :]
        partial = mask & some_invalid[:, None, None, :]
        key_valid = valid.to(torch.int32).contiguous()
    if partial_mask is not None:
        pm = partial_mask.reshape((1,) * (4 - partial_mask.dim()) + tuple(partial_mask.shape))
        partial = (partial | pm) & mask
    full = mask & ~partial
    return full, partial, key_valid


def _build(block_mask, key_padding_mask, groups, n, block_size):
    """FA4 forward and backward BlockSparseTensorsTorch plus (mask_mod, aux_tensors)."""
    _, bs_mod, _ = _fa4()
    partial_mask, q_groups, k_groups, pairs = groups if groups is not None else (None,) * 4
    full, partial, key_valid = split_full_partial(block_mask, key_padding_mask, partial_mask, n, block_size)
    fc, fi = _lists(full)
    pc, pi = _lists(partial)
    tfull, tpartial = full.transpose(-1, -2), partial.transpose(-1, -2)
    bfc, bfi = _lists(tfull)
    bpc, bpi = _lists(tpartial)
    size = (block_size, block_size)
    fwd = bs_mod.BlockSparseTensorsTorch(pc, pi, fc, fi, block_size=size)
    bwd = bs_mod.BlockSparseTensorsTorch(bpc, bpi, bfc, bfi, block_size=size)
    mods = _mask_mods() if (groups is not None or key_valid is not None) else {}
    if groups is not None:
        aux = [q_groups.to(torch.int32).contiguous(), k_groups.to(torch.int32).contiguous(),
               pairs.to(torch.int32).contiguous()]
        if key_valid is not None:
            return fwd, bwd, mods["group_pair_key_valid"], aux + [key_valid]
        return fwd, bwd, mods["group_pair"], aux
    if key_valid is not None:
        return fwd, bwd, mods["key_valid"], [key_valid]
    return fwd, bwd, None, None


def _tensors(block_mask, key_padding_mask, groups, n, block_size):
    """Cached :func:`_build` on the mask's BlockIndex (the same mask, padding and groups give the same lists)."""
    from ..indices import block_index

    index = block_index(block_mask)
    partial_mask = groups[0] if groups is not None else None
    key = (n, block_size,
           id(key_padding_mask), getattr(key_padding_mask, "_version", None),
           id(partial_mask), getattr(partial_mask, "_version", None))
    hit = index.extras.get("fa4")
    if hit is not None and hit[0] == key:
        return hit[2]
    built = _build(block_mask, key_padding_mask, groups, n, block_size)
    # keep the keyed tensors alive with the entry, so that their ids cannot be reused while it is cached
    index.extras["fa4"] = (key, (key_padding_mask, groups), built)
    return built


def _bnhd(x: Tensor, layout: str) -> Tensor:
    return x if layout == "bnhd" else x.transpose(1, 2)


def forward(q, k, v, block_mask, key_padding_mask, groups, block_size, scale, layout, out) -> Tensor:
    """Writes ``out`` (caller's layout); returns FA4's LSE ``[B, H, N]`` (fp32, natural log, -inf on empty rows)."""
    interface, _, _ = _fa4()
    n = q.shape[1] if layout == "bnhd" else q.shape[2]
    fwd, _, mask_mod, aux = _tensors(block_mask, key_padding_mask, groups, n, block_size)
    _, lse, *_ = interface._flash_attn_fwd(
        _bnhd(q, layout), _bnhd(k, layout), _bnhd(v, layout),
        softmax_scale=scale, mask_mod=mask_mod, aux_tensors=aux, block_sparse_tensors=fwd,
        return_lse=True, out=_bnhd(out, layout),
    )
    return lse


def backward(grad_out, q, k, v, out, lse, block_mask, key_padding_mask, groups, block_size, scale, layout,
             deterministic, grads) -> None:
    """Writes ``grads = (dq, dk, dv)`` (caller's layout); refuses ``deterministic`` (FA4's dQ uses atomics)."""
    if deterministic:
        raise ValueError("backend 'fa4' has no deterministic block-sparse backward (FlashAttention-4 accumulates dQ "
                         "with atomics); use the Triton or torch backend for bit-reproducible gradients")
    interface, _, _ = _fa4()
    n = q.shape[1] if layout == "bnhd" else q.shape[2]
    _, bwd, mask_mod, aux = _tensors(block_mask, key_padding_mask, groups, n, block_size)
    dq, dk, dv = (_bnhd(g, layout) for g in grads)
    interface._flash_attn_bwd(
        _bnhd(q, layout), _bnhd(k, layout), _bnhd(v, layout), _bnhd(out, layout), _bnhd(grad_out, layout), lse,
        softmax_scale=scale, dq=dq, dk=dk, dv=dv,
        mask_mod=mask_mod, aux_tensors=aux, block_sparse_tensors=bwd,
    )
