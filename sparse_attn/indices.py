"""Block mask -> compact per-row block lists (and their transpose), built on the mask's device and cached.

The kernels never look at the dense ``[Nb, Nb]`` mask: the forward and the dQ pass walk, for every query
block, the sorted list of kept key blocks (CSR: ``kv_ptr``/``kv_idx``); the dK/dV pass walks, for every key
block, the sorted list of query blocks that attend to it (``q_ptr``/``q_idx``).  Both are built with a
handful of tensor ops (``sum``, ``cumsum``, ``nonzero``) - no Python loop over blocks - and cached on the
mask tensor's identity and ``_version`` so that every layer of a step reuses one build.

A *schedule* is the launch order of the programs: a permutation of ``(batch, head, block)`` entries, heads
of one batch kept together (their K/V share L2) and, within a head, the longest rows first so that the
stragglers start early (longest-processing-time order).

Only changes that advance the mask's version counter (ordinary in-place ops) are noticed: writes through ``.data``
or through a numpy array sharing its memory are not, so build a new mask tensor instead of editing one that way.
"""

from __future__ import annotations

import threading
import time
import weakref
from dataclasses import dataclass, field

import torch

__all__ = ["BlockIndex", "block_index", "clear_index_cache", "SCHEDULES"]

#: Launch orders a schedule can take (see :meth:`BlockIndex.schedule`).
SCHEDULES = ("lpt", "natural")


@dataclass(eq=False)
class BlockIndex:
    """Sparse index form of one block mask.

    Rows are ``(group, block)`` pairs flattened as ``group * num_blocks + block`` where the mask groups are
    its leading ``[Bm, Hm]`` dims (``Bm`` in {1, B}, ``Hm`` in {1, H}); a (batch ``b``, head ``h``) pair uses
    group ``b * group_stride_b + h * group_stride_h``.
    """

    batch_groups: int
    head_groups: int
    num_blocks: int
    kv_ptr: torch.Tensor  # int32 [G*Nb + 1]: CSR offsets of kept key blocks per query-block row
    kv_idx: torch.Tensor  # int32 [nnz + 1]: key-block ids, ascending within a row (one spare slot)
    q_ptr: torch.Tensor  # int32 [G*Nb + 1]: CSR offsets of query blocks per key-block column
    q_idx: torch.Tensor  # int32 [nnz + 1]: query-block ids, ascending within a column
    kv_count: torch.Tensor  # int32 [G, Nb]
    q_count: torch.Tensor  # int32 [G, Nb]
    build_seconds: float = 0.0
    _schedules: dict = field(default_factory=dict, repr=False)
    #: Backend-specific derived data cached with the mask (e.g. FA4's block lists, ``sparse_attn/backends/fa4.py``).
    extras: dict = field(default_factory=dict, repr=False)

    @property
    def num_groups(self) -> int:
        return self.batch_groups * self.head_groups

    def group_strides(self) -> tuple[int, int]:
        """(stride over batch, stride over head) in group units; 0 where the mask is shared."""
        stride_h = 1 if self.head_groups > 1 else 0
        stride_b = self.head_groups if self.batch_groups > 1 else 0
        return stride_b, stride_h

    def schedule(self, batch: int, heads: int, *, transposed: bool, mode: str = "lpt") -> torch.Tensor:
        """Launch order of the ``batch * heads * Nb`` programs as int32 entries ``(b*H + h) * Nb + block``.

        ``transposed=False`` orders query blocks by their number of kept key blocks (forward, dQ);
        ``transposed=True`` orders key blocks by the number of query blocks that use them (dK/dV).
        """
        key = (batch, heads, transposed, mode)
        cached = self._schedules.get(key)
        if cached is not None:
            return cached
        if mode not in SCHEDULES:
            raise ValueError(f"schedule mode must be one of {SCHEDULES}, got {mode!r}")
        nb = self.num_blocks
        device = self.kv_ptr.device
        total = batch * heads * nb
        if mode == "natural":
            order = torch.arange(total, device=device, dtype=torch.int64)
        else:
            counts = (self.q_count if transposed else self.kv_count).to(torch.int64)  # [G, Nb]
            counts = counts.view(self.batch_groups, self.head_groups, nb)
            counts = counts.expand(batch if self.batch_groups == 1 else -1, heads if self.head_groups == 1 else -1, nb)
            counts = counts.reshape(batch * heads, nb)
            bh = torch.arange(batch * heads, device=device, dtype=torch.int64)[:, None]
            blk = torch.arange(nb, device=device, dtype=torch.int64)[None, :]
            # head-major, then descending work, then ascending block: one sort on a unique int64 key.
            sort_key = (bh * (nb + 1) + (nb - counts)) * nb + blk
            order = torch.argsort(sort_key.reshape(-1))
        sched = order.to(torch.int32)
        self._schedules[key] = sched
        return sched


def _csr(mask_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row-major CSR of a bool ``[R, C]`` matrix: (ptr int32 [R+1], idx int32 [nnz+1], count int32 [R])."""
    rows, cols = mask_rows.shape
    count = mask_rows.sum(dim=1, dtype=torch.int32)
    ptr = torch.zeros(rows + 1, dtype=torch.int32, device=mask_rows.device)
    torch.cumsum(count, dim=0, out=ptr[1:])
    flat = torch.nonzero(mask_rows.reshape(-1)).squeeze(1)  # row-major: sorted by (row, col)
    idx = torch.empty(flat.numel() + 1, dtype=torch.int32, device=mask_rows.device)
    idx[:-1] = flat % cols
    idx[-1] = 0  # spare slot: kernels may read entry 0 of an otherwise empty list
    return ptr, idx, count


def _build(block_mask: torch.Tensor) -> BlockIndex:
    t0 = time.perf_counter()
    nb = block_mask.shape[-1]
    if block_mask.dim() == 2:
        bg, hg = 1, 1
    elif block_mask.dim() == 3:
        bg, hg = 1, block_mask.shape[0]
    else:
        bg, hg = block_mask.shape[0], block_mask.shape[1]
    m = block_mask.reshape(bg * hg, nb, nb)
    kv_ptr, kv_idx, kv_count = _csr(m.reshape(bg * hg * nb, nb))
    q_ptr, q_idx, q_count = _csr(m.transpose(1, 2).reshape(bg * hg * nb, nb))
    return BlockIndex(
        batch_groups=bg,
        head_groups=hg,
        num_blocks=nb,
        kv_ptr=kv_ptr,
        kv_idx=kv_idx,
        q_ptr=q_ptr,
        q_idx=q_idx,
        kv_count=kv_count.view(bg * hg, nb),
        q_count=q_count.view(bg * hg, nb),
        build_seconds=time.perf_counter() - t0,
    )


class _Entry:
    __slots__ = ("ref", "version", "snapshot", "index")

    def __init__(self, ref, version, snapshot, index):
        self.ref, self.version, self.snapshot, self.index = ref, version, snapshot, index


_CACHE: dict[int, _Entry] = {}
_LOCK = threading.RLock()  # re-entrant: a weakref callback may fire while it is held
#: Number of index builds so far (tests use it to check that the cache is hit).
build_count = 0


def _version_of(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # inference tensors carry no version counter
        return None


def block_index(block_mask: torch.Tensor) -> BlockIndex:
    """The :class:`BlockIndex` of a bool block mask (``[Nb, Nb]``, ``[Hm, Nb, Nb]`` or ``[B, Hm, Nb, Nb]``).

    Cached on the tensor's identity and version counter: the same (unmodified) tensor returns the same
    index; an in-place change of the mask, or a new tensor, triggers a rebuild.  Inference-mode tensors
    have no version counter, so for them a private copy is compared instead.
    """
    global build_count
    key = id(block_mask)
    version = _version_of(block_mask)
    with _LOCK:
        entry = _CACHE.get(key)
        if entry is not None and entry.ref() is block_mask:
            if version is not None and entry.version == version:
                return entry.index
            if version is None and entry.snapshot is not None and torch.equal(entry.snapshot, block_mask):
                return entry.index
        index = _build(block_mask)
        build_count += 1

        def _drop(_ref, key=key):
            with _LOCK:
                current = _CACHE.get(key)
                if current is not None and current.ref is _ref:
                    del _CACHE[key]

        snapshot = block_mask.clone() if version is None else None
        _CACHE[key] = _Entry(weakref.ref(block_mask, _drop), version, snapshot, index)
        return index


def clear_index_cache() -> None:
    """Forget every cached index (frees their device memory)."""
    with _LOCK:
        _CACHE.clear()
