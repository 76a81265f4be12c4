"""Sparse VideoGen2 attention (semantic-aware permutation), trainable.

Per (batch, head) the video queries and keys are clustered separately (k-means on
*detached* tensors), each side is permuted so that its clusters are contiguous, and
a centroid-level estimate of the attention mass chooses, per query cluster, the key
clusters to attend (top-p).  Attention then runs over the permuted sequence on
variable-length key ranges (Triton forward + backward in
``sparse_attn.kernels.range_attention``, or an exact pure-torch path) and the output
is permuted back.

Routing is a constant of the step: the clusters, the permutation and the selected
(query cluster, key cluster) pairs are computed without gradient.  Gradients reach
``q``, ``k`` and ``v`` through the attention itself and through the permutation
gathers (whose backward is the inverse gather), exactly as for attention with a
fixed mask.  With ``top_p=1`` (or ``min_kc_ratio=1``) every non-empty key cluster is
selected, so output and gradients equal dense attention.

Selection rule (official SVG2): ``S = c_q c_k^T / sqrt(D)``; per query-cluster row
``P'_ij = |K_j| exp(S_ij) / sum_k |K_k| exp(S_ik)`` (fp32); sort descending and keep
the smallest prefix whose sum reaches ``top_p`` (the cluster that crosses it is kept,
so the top-1 always is), and never fewer than ``floor(min_kc_ratio * Ck)`` clusters
(``int(...)`` as in the official code; ``Ck`` is the cluster count after clamping to
the number of video tokens).  Empty clusters are never selected.

Text tokens (the last ``text_tokens`` positions, as HunyuanVideo and Mochi append
them) form one extra cluster on each side: every query attends the valid text keys,
and text queries attend every valid key.  ``key_padding_mask`` (True = valid) may mark
text positions invalid; those keys are moved to the end of the text range and left
out of every key range, so they never enter a softmax.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, ContextManager

import torch
from torch import Tensor, nn

from . import ops
from .backends import fa4
from .interpreter import interpreting
from .kernels.range_attention import SUPPORTED_HEAD_DIMS, RangeLayout, build_range_layout
from .ops import range_attention
from .kmeans import KMeansResult, batched_kmeans
from .svg2_blocks import GroupBlocks, group_blocks

__all__ = ["SVG2State", "SVG2Attention", "svg2_attention"]

_COLD_ITERS = 50
_WARM_ITERS = 2
_BACKENDS = ("auto", "fa4", "triton", "torch")
#: Block size of the block-sparse ("fa4") path: FA4's sparse blocks are 128 x 128.
_BLOCK = 128


@dataclass
class SVG2State:
    """Per-layer memory between calls: centroids for the warm start and last-call statistics.

    q_centroids / k_centroids: fp32 [B, H, C, D] (cluster counts after clamping).
    density: attended (query, key) pairs / N^2 including text, mean over (batch, head).
    density_per_head: fp32 [B, H].  q/k_cluster_sizes: int64 [B, H, C] (video clusters).
    q/k_inertia: fp32 [B, H] k-means inertia.  kmeans_iterations: (q, k) Lloyd iterations run.
    warm_started: whether this call's k-means started from the previous centroids.
    """

    q_centroids: Tensor | None = None
    k_centroids: Tensor | None = None
    density: float | None = None
    density_per_head: Tensor | None = None
    q_cluster_sizes: Tensor | None = None
    k_cluster_sizes: Tensor | None = None
    q_inertia: Tensor | None = None
    k_inertia: Tensor | None = None
    kmeans_iterations: tuple[int, int] | None = None
    warm_started: bool = False
    calls: int = 0


@dataclass
class _Plan:
    """Routing of one call (all constants of the step)."""

    q_perm: Tensor  # int64 [B, H, N], permuted position -> original position
    q_inv: Tensor  # int64 [B, H, N], original position -> permuted position
    k_perm: Tensor
    k_inv: Tensor
    layout: RangeLayout | None  # range-kernel path ("triton", "torch")
    state: SVG2State
    extras: dict = field(default_factory=dict)
    blocks: GroupBlocks | None = None  # block-sparse path ("fa4")


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------
def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _validate_config(num_q_clusters, num_k_clusters, top_p, min_kc_ratio, kmeans_iters, backend) -> None:
    for name, val in (("num_q_clusters", num_q_clusters), ("num_k_clusters", num_k_clusters)):
        if not _is_int(val) or val < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {val!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0.0 < float(top_p) <= 1.0:
        raise ValueError(f"top_p: expected a float in (0, 1], got {top_p!r}")
    if isinstance(min_kc_ratio, bool) or not isinstance(min_kc_ratio, (int, float)) or not 0.0 <= float(min_kc_ratio) <= 1.0:
        raise ValueError(f"min_kc_ratio: expected a float in [0, 1], got {min_kc_ratio!r}")
    if kmeans_iters is not None and (not _is_int(kmeans_iters) or kmeans_iters < 1):
        raise ValueError(f"kmeans_iters: expected None or an int >= 1, got {kmeans_iters!r}")
    if backend not in _BACKENDS:
        raise ValueError(f"backend: expected one of {_BACKENDS}, got {backend!r}")


def _validate_inputs(q, k, v, text_tokens, key_padding_mask, state) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name}: expected shape [B, H, N, D], got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name}: expected a floating-point tensor, got {t.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"{name}: expected the shape of q {tuple(q.shape)}, got {tuple(t.shape)}")
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{name}: expected dtype/device of q ({q.dtype}, {q.device}), got ({t.dtype}, {t.device})")
    b, _, n, d = q.shape
    if b < 1 or n < 1 or d < 1 or q.shape[1] < 1:
        raise ValueError(f"q: expected non-empty [B, H, N, D], got {tuple(q.shape)}")
    if not _is_int(text_tokens) or not 0 <= text_tokens < n:
        raise ValueError(f"text_tokens: expected an int in [0, N) with N={n} (at least one video token), got {text_tokens!r}")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
            raise ValueError("key_padding_mask: expected a bool tensor [B, N] (True = valid key)")
        if tuple(key_padding_mask.shape) != (b, n):
            raise ValueError(f"key_padding_mask: expected shape {(b, n)}, got {tuple(key_padding_mask.shape)}")
        if not bool(key_padding_mask[:, : n - text_tokens].all()):
            raise ValueError(
                f"key_padding_mask: only the last text_tokens={text_tokens} (text) positions may be False; "
                "video keys are always valid"
            )
    if state is not None and not isinstance(state, SVG2State):
        raise TypeError(f"state: expected an SVG2State or None, got {type(state).__name__}")


def _resolve_backend(backend: str, q: Tensor) -> str:
    """``auto``: the Triton range kernel on CUDA, else torch.  The FA4 128-block form is only taken when asked for:
    on an H200 (Wan 41x1560, top-p 0.9) cluster boundaries left 82% of its blocks partial (masked per token) and it
    ran fwd+bwd in 119.8 ms against the range kernel's 65.6 ms (docs/benchmarks.md)."""
    d = q.shape[-1]
    triton_ok = q.dtype in (torch.float16, torch.bfloat16, torch.float32) and d in SUPPORTED_HEAD_DIMS
    if backend == "auto":
        return "triton" if q.is_cuda and triton_ok else "torch"
    if backend == "fa4":
        reason = fa4.unsupported_reason(q, _BLOCK)
        if reason is not None:
            raise reason[0](f"backend: 'fa4': {reason[1]}")
    if backend == "triton":
        if not triton_ok:
            raise ValueError(
                f"backend: 'triton' needs fp16/bf16/fp32 and head dim in {SUPPORTED_HEAD_DIMS}, got {q.dtype}, D={d}"
            )
        if not q.is_cuda:
            if not interpreting():
                raise ValueError("backend: 'triton' on CPU runs only under TRITON_INTERPRET=1; use backend='torch'")
            if q.dtype == torch.bfloat16:
                raise ValueError("backend: the Triton interpreter mishandles bf16; use fp16/fp32 or backend='torch'")
    return backend


def _tile_config(q: Tensor) -> dict:
    """Kernel tiling.  On sm_90 every kernel has autotune configs that do not spill at these sizes (ptxas -v)."""
    if not q.is_cuda:  # interpreter: small programs, still exercising the sub-tiled dQ pass
        return dict(tile_m=32, tile_n=16, chunk_m=16, chunk_n=16, dq_block_m=16)
    if q.dtype == torch.float32:
        return dict(tile_m=64, tile_n=32, chunk_m=32, chunk_n=32, dq_block_m=32)
    return dict(tile_m=128, tile_n=64, chunk_m=64, chunk_n=64, dq_block_m=64)


# ----------------------------------------------------------------------------------------------
# routing stages (no autograd)
# ----------------------------------------------------------------------------------------------
def _cluster(
    x: Tensor, num_clusters: int, prev: Tensor | None, kmeans_iters: int | None
) -> tuple[KMeansResult, bool]:
    """k-means of ``x [B, H, Nv, D]`` per (b, h); warm start when ``prev`` fits."""
    b, h, n, d = x.shape
    warm = prev is not None and tuple(prev.shape) == (b, h, num_clusters, d)
    iters = kmeans_iters if kmeans_iters is not None else (_WARM_ITERS if warm else _COLD_ITERS)
    init = prev.reshape(b * h, num_clusters, d) if warm else None
    res = batched_kmeans(x.reshape(b * h, n, d), num_clusters, iters=iters, init_centroids=init)
    return res, warm


def _select(
    q_centroids: Tensor, k_centroids: Tensor, k_sizes: Tensor, top_p: float, min_kc_ratio: float
) -> Tensor:
    """Selected (query cluster, key cluster) pairs: bool [G, Cq, Ck] (see module docstring)."""
    d = q_centroids.shape[-1]
    ck = k_centroids.shape[1]
    nonempty = k_sizes > 0  # [G, Ck]
    s = torch.bmm(q_centroids.float(), k_centroids.float().transpose(1, 2)) / math.sqrt(d)
    s = s.masked_fill(~nonempty[:, None, :], float("-inf"))
    w = k_sizes[:, None, :].float() * torch.exp(s - s.amax(-1, keepdim=True))
    p = w / w.sum(-1, keepdim=True)
    if top_p >= 1.0:  # exact maths: every non-empty cluster has P' > 0
        return nonempty[:, None, :].expand_as(p).clone()
    p_sorted, order = torch.sort(p, dim=-1, descending=True, stable=True)
    before = torch.cumsum(p_sorted, -1).roll(1, -1)  # mass of the clusters ranked above
    before[..., 0] = 0.0
    rank = torch.arange(ck, device=p.device)
    keep = (before < top_p) | (rank < int(min_kc_ratio * ck))
    keep &= torch.gather(nonempty[:, None, :].expand_as(p), -1, order)
    return torch.zeros_like(keep).scatter_(-1, order, keep)


def _inverse(perm: Tensor) -> Tensor:
    ar = torch.arange(perm.shape[-1], device=perm.device).expand_as(perm)
    return torch.empty_like(perm).scatter_(-1, perm, ar)


def _permutations(
    q_labels: Tensor, k_labels: Tensor, b: int, h: int, n: int, text_tokens: int, key_padding_mask: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Stable sort by cluster label (video part); text stays last, valid text keys first."""
    nv = n - text_tokens
    dev = q_labels.device
    q_video = torch.argsort(q_labels, dim=-1, stable=True).view(b, h, nv)
    k_video = torch.argsort(k_labels, dim=-1, stable=True).view(b, h, nv)
    q_text = torch.arange(nv, n, device=dev).expand(b, h, text_tokens)
    if key_padding_mask is not None and text_tokens:
        order = torch.argsort((~key_padding_mask[:, nv:]).to(torch.int8), dim=-1, stable=True) + nv
        k_text = order[:, None, :].expand(b, h, text_tokens)
    else:
        k_text = q_text
    q_perm = torch.cat([q_video, q_text], -1)
    k_perm = torch.cat([k_video, k_text], -1)
    return q_perm, _inverse(q_perm), k_perm, _inverse(k_perm)


def _group_map(
    sel: Tensor, q_sizes: Tensor, k_sizes: Tensor, b: int, h: int, text_tokens: int, text_valid: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Add the text groups: query groups = Cq clusters + text; key groups = Ck + valid text + padded text."""
    g, cq, ck = sel.shape
    dev = sel.device
    ext = torch.zeros(g, cq + 1, ck + 2, dtype=torch.bool, device=dev)
    ext[:, :cq, :ck] = sel
    ext[:, :, ck] = True  # everyone attends the valid text keys
    ext[:, cq, : ck + 1] = True  # text queries attend everything valid
    tv = text_valid.to(dev).long().repeat_interleave(h)  # [G]
    row_sizes = torch.cat([q_sizes, torch.full((g, 1), text_tokens, dtype=torch.long, device=dev)], 1)
    col_sizes = torch.cat([k_sizes, tv[:, None], (text_tokens - tv)[:, None]], 1)
    return ext, row_sizes, col_sizes


def _plan(
    q: Tensor,
    k: Tensor,
    *,
    num_q_clusters: int,
    num_k_clusters: int,
    top_p: float,
    min_kc_ratio: float,
    kmeans_iters: int | None,
    state: SVG2State | None,
    text_tokens: int,
    key_padding_mask: Tensor | None,
    tiles: dict | None,
    stage: Callable[[str], ContextManager],
) -> _Plan:
    """Routing of one call; ``tiles=None`` builds the block-sparse form instead of the range layout."""
    b, h, n, d = q.shape
    nv = n - text_tokens
    cq, ck = min(num_q_clusters, nv), min(num_k_clusters, nv)
    q, k = q.detach(), k.detach()
    with stage("kmeans"):
        rq, warm_q = _cluster(q[:, :, :nv], cq, state.q_centroids if state else None, kmeans_iters)
        rk, warm_k = _cluster(k[:, :, :nv], ck, state.k_centroids if state else None, kmeans_iters)
    with stage("selection"):
        sel = _select(rq.centroids, rk.centroids, rk.sizes, float(top_p), float(min_kc_ratio))
    with stage("layout"):
        q_perm, q_inv, k_perm, k_inv = _permutations(rq.labels, rk.labels, b, h, n, text_tokens, key_padding_mask)
        if key_padding_mask is not None:
            text_valid = key_padding_mask[:, nv:].sum(-1)
        else:
            text_valid = torch.full((b,), text_tokens, dtype=torch.long, device=q.device)
        ext, row_sizes, col_sizes = _group_map(sel, rq.sizes, rk.sizes, b, h, text_tokens, text_valid)
        if tiles is None:  # block-sparse path
            layout = None
            blocks = group_blocks(ext, row_sizes, col_sizes, n, _BLOCK)
            pairs = (ext.double() * row_sizes[:, :, None].double() * col_sizes[:, None, :].double()).sum((1, 2))
        else:
            blocks = None
            layout = build_range_layout(ext, row_sizes, col_sizes, **tiles)
            pairs = layout.num_pairs.double()
    dens = (pairs / float(n) ** 2).float().view(b, h)
    prev_calls = state.calls if state is not None else 0
    new_state = SVG2State(
        q_centroids=rq.centroids.view(b, h, cq, d),
        k_centroids=rk.centroids.view(b, h, ck, d),
        density=float(dens.mean()),
        density_per_head=dens,
        q_cluster_sizes=rq.sizes.view(b, h, cq),
        k_cluster_sizes=rk.sizes.view(b, h, ck),
        q_inertia=rq.inertia.view(b, h),
        k_inertia=rk.inertia.view(b, h),
        kmeans_iterations=(rq.iterations, rk.iterations),
        warm_started=warm_q and warm_k,
        calls=prev_calls + 1,
    )
    extras = {"selection": sel, "q_labels": rq.labels, "k_labels": rk.labels}
    return _Plan(q_perm, q_inv, k_perm, k_inv, layout, new_state, extras, blocks)


# ----------------------------------------------------------------------------------------------
# differentiable pieces
# ----------------------------------------------------------------------------------------------
def _gather_tokens(x: Tensor, idx: Tensor) -> Tensor:
    b, h = x.shape[:2]
    bi = torch.arange(b, device=x.device)[:, None, None]
    hi = torch.arange(h, device=x.device)[None, :, None]
    return x[bi, hi, idx]


class _Permute(torch.autograd.Function):
    """``y[b,h,i] = x[b,h,perm[b,h,i]]``; the backward is the gather by the inverse permutation."""

    @staticmethod
    def forward(ctx, x, perm, inv):  # type: ignore[override]
        ctx.save_for_backward(inv)
        return _gather_tokens(x, perm)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (inv,) = ctx.saved_tensors
        return _gather_tokens(grad, inv), None, None


def permute_tokens(x: Tensor, perm: Tensor, inv: Tensor) -> Tensor:
    """Differentiable token permutation of ``x [B, H, N, D]`` (``inv`` must be the inverse of ``perm``)."""
    return _Permute.apply(x, perm, inv)


def range_attention_torch(q: Tensor, k: Tensor, v: Tensor, layout: RangeLayout, *, scale: float | None = None) -> Tensor:
    """Exact, differentiable pure-torch twin of the Triton range kernel (CPU path).

    Per query group it gathers the token indices of its key ranges and runs a softmax
    over those only, in query chunks, so nothing N x N is ever materialised (the
    largest block is chunk x attended keys).  Rows without keys give zeros.
    """
    b, h, n, d = q.shape
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf, kf, vf = (t.reshape(b * h, n, d).to(cdt) for t in (q, k, v))
    r_n = layout.rows_per_bh
    sizes = layout.row_sizes.tolist()
    offs = layout.row_offsets.tolist()
    ptr = layout.q_range_ptr.tolist()
    rs = layout.q_range_start.tolist()
    re = layout.q_range_end.tolist()
    q_chunk = 1024
    per_bh = []
    for bh in range(b * h):
        pieces = []
        covered = 0
        for r in range(r_n):
            size = sizes[bh][r]
            if size == 0:
                continue
            s0 = offs[bh][r]
            g = bh * r_n + r
            if ptr[g] == ptr[g + 1]:
                pieces.append(qf.new_zeros(size, d))
            else:
                idx = torch.cat([torch.arange(rs[j], re[j], device=q.device) for j in range(ptr[g], ptr[g + 1])])
                kk = kf[bh].index_select(0, idx)
                vv = vf[bh].index_select(0, idx)
                for c0 in range(s0, s0 + size, q_chunk):
                    c1 = min(c0 + q_chunk, s0 + size)
                    att = torch.softmax((qf[bh, c0:c1] @ kk.T) * scale, dim=-1)
                    pieces.append(att @ vv)
            covered = s0 + size
        if covered < n:
            pieces.append(qf.new_zeros(n - covered, d))
        per_bh.append(torch.cat(pieces, 0))
    return torch.stack(per_bh, 0).view(b, h, n, d).to(q.dtype)


def blocks_attention(
    q: Tensor, k: Tensor, v: Tensor, blocks: GroupBlocks, *, backend: str, scale: float | None = None
) -> Tensor:
    """Attention of permuted ``q, k, v [B, H, N, D]`` over the block form of a routing (``"fa4"`` or ``"torch"``),
    through the block-sparse custom op (so selective checkpointing and ``torch.compile`` see it)."""
    b, h, n, d = q.shape
    nb = blocks.block_mask.shape[-1]
    rq, rk = blocks.pairs.shape[-2:]
    out, _ = ops.block_sparse_fwd(
        q, k, v, blocks.block_mask.view(b, h, nb, nb), None, blocks.partial.view(b, h, nb, nb),
        blocks.q_groups.view(b, h, -1), blocks.k_groups.view(b, h, -1), blocks.pairs.view(b, h, rq, rk),
        _BLOCK, float(scale if scale is not None else 1.0 / math.sqrt(d)), backend, "bhnd",
        torch.are_deterministic_algorithms_enabled(),
    )
    return out


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------
def _svg2_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    num_q_clusters: int,
    num_k_clusters: int,
    top_p: float,
    min_kc_ratio: float,
    kmeans_iters: int | None,
    state: SVG2State | None,
    text_tokens: int,
    key_padding_mask: Tensor | None,
    backend: str,
    stage: Callable[[str], ContextManager] | None = None,
) -> tuple[Tensor, SVG2State]:
    """svg2_attention with an optional per-stage timer ``stage(name) -> context manager`` (benchmarks)."""
    _validate_config(num_q_clusters, num_k_clusters, top_p, min_kc_ratio, kmeans_iters, backend)
    _validate_inputs(q, k, v, text_tokens, key_padding_mask, state)
    backend = _resolve_backend(backend, q)
    stage = stage or (lambda name: contextlib.nullcontext())
    if key_padding_mask is not None:
        key_padding_mask = key_padding_mask.to(q.device)
    with torch.no_grad():
        plan = _plan(
            q, k,
            num_q_clusters=num_q_clusters, num_k_clusters=num_k_clusters, top_p=top_p,
            min_kc_ratio=min_kc_ratio, kmeans_iters=kmeans_iters, state=state, text_tokens=text_tokens,
            key_padding_mask=key_padding_mask, tiles=None if backend == "fa4" else _tile_config(q), stage=stage,
        )
    with stage("permute"):
        qp = permute_tokens(q, plan.q_perm, plan.q_inv)
        kp = permute_tokens(k, plan.k_perm, plan.k_inv)
        vp = permute_tokens(v, plan.k_perm, plan.k_inv)
    with stage("attention"):
        if backend == "fa4":
            op = blocks_attention(qp, kp, vp, plan.blocks, backend="fa4")
        elif backend == "triton":
            op = range_attention(qp, kp, vp, plan.layout)
        else:
            op = range_attention_torch(qp, kp, vp, plan.layout)
    with stage("inverse_permute"):
        out = permute_tokens(op, plan.q_inv, plan.q_perm)
    return out, plan.state


def svg2_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    num_q_clusters: int = 100,
    num_k_clusters: int = 500,
    top_p: float = 0.9,
    min_kc_ratio: float = 0.1,
    kmeans_iters: int | None = None,
    state: SVG2State | None = None,
    text_tokens: int = 0,
    key_padding_mask: Tensor | None = None,
    backend: str = "auto",
) -> tuple[Tensor, SVG2State]:
    """Sparse VideoGen2 attention of ``q, k, v [B, H, N, D]`` (any strides); returns ``(out, new_state)``.

    Routing (k-means clusters, permutation, selected cluster pairs) is computed on
    detached inputs and is a constant of the step; gradients flow to q, k, v through
    the attention and the permutation gathers.  Cluster counts are clamped to the
    number of video tokens ``N - text_tokens``.  ``kmeans_iters=None`` runs 50 Lloyd
    iterations from k-means++ seeds, or 2 when ``state`` holds centroids of matching
    shape (otherwise the state is ignored and clustering starts cold).  Pass the
    returned state to the next call of the same layer.

    backend: "fa4" (FlashAttention-4 block-sparse: the selected cluster pairs as 128x128
    blocks, partial blocks masked per token by cluster id; sm90/sm100, fp16/bf16, D in
    {64, 128}; needs ``flash-attn-4``), "triton" (range kernel; CUDA, fp16/bf16/fp32, D in
    16..128 power of two; on CPU only under TRITON_INTERPRET=1), "torch" (exact pure-torch
    path), or "auto" (Triton on CUDA when supported, else torch: the range kernel measured
    faster than the 128-block FA4 form, whose cluster-boundary blocks are mostly partial).
    """
    return _svg2_forward(
        q, k, v,
        num_q_clusters=num_q_clusters, num_k_clusters=num_k_clusters, top_p=top_p, min_kc_ratio=min_kc_ratio,
        kmeans_iters=kmeans_iters, state=state, text_tokens=text_tokens, key_padding_mask=key_padding_mask,
        backend=backend,
    )


class SVG2Attention(nn.Module):
    """SVG2 attention that keeps one :class:`SVG2State` (centroid cache) per layer instance.

    The state is plain module memory, not part of ``state_dict``: after a restart the
    first call clusters cold.  Note that activation checkpointing re-runs the forward
    with the already updated state, so the recomputed routing may differ slightly from
    the first pass; call with ``kmeans_iters`` fixed or disable the cache if that matters.
    """

    def __init__(
        self,
        num_q_clusters: int = 100,
        num_k_clusters: int = 500,
        *,
        top_p: float = 0.9,
        min_kc_ratio: float = 0.1,
        kmeans_iters: int | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        _validate_config(num_q_clusters, num_k_clusters, top_p, min_kc_ratio, kmeans_iters, backend)
        self.num_q_clusters = num_q_clusters
        self.num_k_clusters = num_k_clusters
        self.top_p = top_p
        self.min_kc_ratio = min_kc_ratio
        self.kmeans_iters = kmeans_iters
        self.backend = backend
        self.state: SVG2State | None = None

    def reset_state(self) -> None:
        self.state = None

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, *, text_tokens: int = 0, key_padding_mask: Tensor | None = None
    ) -> Tensor:
        out, self.state = svg2_attention(
            q, k, v,
            num_q_clusters=self.num_q_clusters, num_k_clusters=self.num_k_clusters, top_p=self.top_p,
            min_kc_ratio=self.min_kc_ratio, kmeans_iters=self.kmeans_iters, state=self.state,
            text_tokens=text_tokens, key_padding_mask=key_padding_mask, backend=self.backend,
        )
        return out

    def extra_repr(self) -> str:
        return (
            f"num_q_clusters={self.num_q_clusters}, num_k_clusters={self.num_k_clusters}, top_p={self.top_p}, "
            f"min_kc_ratio={self.min_kc_ratio}, kmeans_iters={self.kmeans_iters}, backend={self.backend!r}"
        )
