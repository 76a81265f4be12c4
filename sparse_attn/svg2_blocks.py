"""SVG2 routing as 128-token blocks: selected (query group, key group) pairs on the permuted sequence -> block masks.

After SVG2's permutation every group (a k-means cluster, the text, the padded text) is one contiguous token range,
so a block of the permuted sequence covers the consecutive groups ``gid[first token] .. gid[last token]``, every
non-empty one of them.  For a pair of blocks, count over that rectangle of groups (2-D prefix sums, no loop over
blocks) the selected pairs and the possible pairs (both groups non-empty):

* no selected pair -> the block pair is skipped;
* all possible pairs selected -> *full*: computed without any token mask;
* otherwise *partial*: query ``i`` sees key ``j`` only if ``pairs[gid_q[i], gid_k[j]]`` (FA4's ``mask_mod`` with the
  group ids as ``aux_tensors``; the torch path applies the same token mask).

Positions past ``N`` get an extra group whose pairs are all False, so partial tail blocks need no length mask.
With ``top_p=1`` every non-empty pair is selected: every kept block is full, i.e. dense attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["GroupBlocks", "group_blocks"]

# Elements of one [groups, Nb, Nb] working tensor (int32) per chunk of (batch, head) groups.
_CHUNK_ELEMENTS = 1 << 23


@dataclass
class GroupBlocks:
    """Block form of one SVG2 routing; leading dim ``G = B * H``."""

    block_mask: Tensor  # bool [G, Nb, Nb]: block pairs with at least one selected token pair
    partial: Tensor  # bool [G, Nb, Nb]: the subset that needs the token mask
    q_groups: Tensor  # int32 [G, Nb*bs]: group of each permuted query position (R = padding)
    k_groups: Tensor  # int32 [G, Nb*bs]: group of each permuted key position (C = padding)
    pairs: Tensor  # bool [G, R+1, C+1]: selected (query group, key group) pairs, padding row/column False


def _token_groups(sizes: Tensor, n_pad: int) -> Tensor:
    """Group id of every position ``0..n_pad-1`` from per-group sizes ``[G, R]`` (positions past the sum -> R)."""
    ends = torch.cumsum(sizes, dim=-1)
    pos = torch.arange(n_pad, device=sizes.device).expand(sizes.shape[0], n_pad).contiguous()
    return torch.searchsorted(ends.contiguous(), pos, right=True).to(torch.int32)


def _prefix2d(x: Tensor) -> Tensor:
    """Inclusive 2-D prefix sums with a zero first row/column: ``[G, R, C] -> [G, R+1, C+1]`` (int64)."""
    p = torch.nn.functional.pad(x.to(torch.int64), (1, 0, 1, 0))
    return p.cumsum(1).cumsum(2)


def _rect(p: Tensor, a0: Tensor, a1: Tensor, b0: Tensor, b1: Tensor) -> Tensor:
    """Sums of the rectangles ``[a0..a1] x [b0..b1]`` (inclusive): ``a [G, Nb, 1]``, ``b [G, 1, Nb]`` -> ``[G, Nb, Nb]``."""
    g = torch.arange(p.shape[0], device=p.device)[:, None, None]
    return p[g, a1 + 1, b1 + 1] - p[g, a0, b1 + 1] - p[g, a1 + 1, b0] + p[g, a0, b0]


def group_blocks(selected: Tensor, row_sizes: Tensor, col_sizes: Tensor, n: int, block_size: int = 128) -> GroupBlocks:
    """Block masks of a group-pair selection on the permuted sequence.

    Args:
        selected: bool ``[G, R, C]``, True = query group ``r`` attends key group ``c``.
        row_sizes / col_sizes: int ``[G, R]`` / ``[G, C]`` tokens per query / key group, each summing to ``n``.
        n: sequence length; block_size: tokens per block.
    """
    g, r, c = selected.shape
    nb = -(-n // block_size)
    n_pad = nb * block_size
    q_groups = _token_groups(row_sizes, n_pad)
    k_groups = _token_groups(col_sizes, n_pad)
    first = torch.arange(nb, device=selected.device) * block_size
    last = torch.clamp(first + block_size, max=n) - 1
    qa0, qa1 = q_groups[:, first].long(), q_groups[:, last].long()  # [G, Nb]
    kb0, kb1 = k_groups[:, first].long(), k_groups[:, last].long()
    # The padding group (id R / C) counts as possible, never chosen: where sizes sum to less than n, the real
    # positions it covers make their blocks partial.
    one = torch.ones_like(row_sizes[:, :1])
    possible = (torch.cat([row_sizes, one], 1) > 0)[:, :, None] & (torch.cat([col_sizes, one], 1) > 0)[:, None, :]
    chosen = torch.nn.functional.pad(selected, (0, 1, 0, 1), value=False) & possible
    block_mask = torch.empty(g, nb, nb, dtype=torch.bool, device=selected.device)
    partial = torch.empty_like(block_mask)
    step = max(1, _CHUNK_ELEMENTS // max(1, nb * nb))
    for s in range(0, g, step):
        e = min(g, s + step)
        p_sel, p_all = _prefix2d(chosen[s:e]), _prefix2d(possible[s:e])
        a0, a1 = qa0[s:e, :, None], qa1[s:e, :, None]
        b0, b1 = kb0[s:e, None, :], kb1[s:e, None, :]
        n_sel = _rect(p_sel, a0, a1, b0, b1)
        n_all = _rect(p_all, a0, a1, b0, b1)
        block_mask[s:e] = n_sel > 0
        partial[s:e] = (n_sel > 0) & (n_sel < n_all)
    return GroupBlocks(block_mask, partial, q_groups, k_groups, chosen)
