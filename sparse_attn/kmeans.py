"""Batched Lloyd k-means over many independent point sets (one per batch*head).

SVG2 clusters the queries and the keys of every (batch, head) separately, so the
natural unit is a batch of ``G = B*H`` point sets ``x [G, N, D]`` with the same
cluster count.  Everything here is vectorised torch (no Python loop over G) and
never holds an ``N x C`` distance matrix at full length: the assignment step walks
the points in chunks sized so that ``G * chunk * C`` stays under a fixed budget.

Why these choices:
- The assignment and update matmuls run in the input dtype on CUDA (fp16/bf16 tensor
  cores with fp32 accumulation; centroids are rounded to the input dtype for the
  assignment, which barely changes the ranking) and in fp32 (fp64 for fp64) elsewhere.
  The update is a one-hot matmul on CUDA (no atomics), ``index_add_`` on CPU.
- A cold start uses k-means++ seeding (deterministic through ``seed``) because a
  random-sample seeding often merges planted clusters; a warm start (centroids of
  the previous call of the same layer) needs only a couple of Lloyd steps.
- Empty clusters keep their previous centroid and report size 0; callers (SVG2
  selection) treat size-0 clusters as absent.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["KMeansResult", "batched_kmeans", "kmeans_plus_plus_init", "assign_labels"]

# Upper bound on the elements of one chunk's [G, chunk, C] score block.
_SCORE_BUDGET = 1 << 25


@dataclass
class KMeansResult:
    """Outcome of :func:`batched_kmeans`.

    labels: int64 [G, N], cluster of every point (from the last assignment step).
    centroids: fp32 [G, C, D], means of the clusters given by ``labels`` (empty -> previous).
    sizes: int64 [G, C], points per cluster.
    inertia: fp32 [G], sum of squared distances of the points to their cluster mean
        (computed as sum|x|^2 - sum_c n_c |mean_c|^2 in fp64).
    iterations: number of Lloyd iterations (assignment + update) that ran.
    converged: True when the last assignment equalled the one before it.
    """

    labels: Tensor
    centroids: Tensor
    sizes: Tensor
    inertia: Tensor
    iterations: int
    converged: bool


def _matmul_dtype(x: Tensor) -> torch.dtype:
    if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16):
        return x.dtype
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _chunk_len(g: int, n: int, c: int) -> int:
    return max(1, min(n, _SCORE_BUDGET // max(1, g * c)))


_BMM_OUT_DTYPE_OK: bool | None = None  # whether torch.bmm(..., out_dtype=float32) works here


def _bmm_f32(a: Tensor, b: Tensor) -> Tensor:
    """Batched matmul with an fp32 result; half inputs on CUDA accumulate in fp32 and are not rounded back."""
    global _BMM_OUT_DTYPE_OK
    if a.is_cuda and a.dtype in (torch.float16, torch.bfloat16) and _BMM_OUT_DTYPE_OK is not False:
        try:
            out = torch.bmm(a, b, out_dtype=torch.float32)
            _BMM_OUT_DTYPE_OK = True
            return out
        except (RuntimeError, TypeError, NotImplementedError):
            _BMM_OUT_DTYPE_OK = False
    return torch.bmm(a, b).float() if a.dtype != torch.float64 else torch.bmm(a, b)


def assign_labels(x: Tensor, centroids: Tensor) -> Tensor:
    """Nearest centroid of every point, chunked over N: ``x [G,N,D]``, ``centroids [G,C,D]`` -> int64 [G,N]."""
    g, n, _ = x.shape
    c = centroids.shape[1]
    mdt = _matmul_dtype(x)
    cen_t = centroids.to(mdt).transpose(1, 2)
    # argmin |x - c|^2 == argmax (x.c - |c|^2 / 2); |x|^2 is constant per point.
    half_sq = 0.5 * centroids.to(torch.float64 if mdt == torch.float64 else torch.float32).pow(2).sum(-1)
    labels = torch.empty(g, n, dtype=torch.long, device=x.device)
    step = _chunk_len(g, n, c)
    for s in range(0, n, step):
        score = _bmm_f32(x[:, s : s + step].to(mdt), cen_t)
        score.sub_(half_sq[:, None, :])
        labels[:, s : s + step] = score.argmax(-1)
    return labels


def _cluster_sums(x: Tensor, labels: Tensor, c: int, *, use_matmul: bool | None = None) -> tuple[Tensor, Tensor]:
    """Per-cluster coordinate sums [G,C,D] (fp32, fp64 for fp64 input) and int64 counts [G,C], chunked over N.

    On CUDA the sums are one-hot matmuls (tensor cores, deterministic, fp32 accumulation);
    elsewhere an exact sequential ``index_add_``.
    """
    g, n, d = x.shape
    acc_dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    offs = (torch.arange(g, device=x.device) * c)[:, None]
    counts = torch.bincount((labels + offs).reshape(-1), minlength=g * c).view(g, c)
    if x.is_cuda if use_matmul is None else use_matmul:
        mdt = _matmul_dtype(x)
        sums = torch.zeros(g, c, d, dtype=acc_dt, device=x.device)
        step = _chunk_len(g, n, c)
        for s in range(0, n, step):
            lab = labels[:, s : s + step]
            onehot = torch.zeros(g, c, lab.shape[1], dtype=mdt, device=x.device)
            onehot.scatter_(1, lab[:, None, :], 1)
            sums += _bmm_f32(onehot, x[:, s : s + step].to(mdt)).to(acc_dt)
        return sums, counts
    sums = torch.zeros(g * c, d, dtype=acc_dt, device=x.device)
    step = _chunk_len(g, n, d)
    for s in range(0, n, step):
        idx = (labels[:, s : s + step] + offs).reshape(-1)
        sums.index_add_(0, idx, x[:, s : s + step].reshape(-1, d).to(acc_dt))
    return sums.view(g, c, d), counts


def kmeans_plus_plus_init(x: Tensor, num_clusters: int, *, generator: torch.Generator | None = None) -> Tensor:
    """k-means++ seeding for every point set at once: ``x [G,N,D]`` -> fp32 centroids [G,C,D].

    Costs C sequential O(G*N*D) steps; it runs once per layer (later calls warm-start).
    Point sets whose points are all identical fall back to uniform sampling.
    """
    g, n, d = x.shape
    mdt = _matmul_dtype(x)
    xm = x.to(mdt)
    xsq = x.float().pow(2).sum(-1)  # [G, N]
    ar = torch.arange(g, device=x.device)
    cent = torch.empty(g, num_clusters, d, dtype=torch.float32, device=x.device)

    def sq_dist(c: Tensor) -> Tensor:  # |x - c|^2 for one new seed per set, c [G, D]
        dots = _bmm_f32(xm, c.to(mdt)[:, :, None]).squeeze(-1).float()
        return (xsq - 2.0 * dots + c.pow(2).sum(-1, keepdim=True)).clamp_min_(0)

    first = torch.randint(0, n, (g,), device=x.device, generator=generator)
    cent[:, 0] = x[ar, first].float()
    best = sq_dist(cent[:, 0])  # squared distance to the nearest chosen seed
    for j in range(1, num_clusters):
        total = best.sum(-1, keepdim=True)
        w = torch.where(total > 0, best, torch.ones_like(best))
        pick = torch.multinomial(w, 1, generator=generator).squeeze(1)
        cent[:, j] = x[ar, pick].float()
        best = torch.minimum(best, sq_dist(cent[:, j]))
    return cent


def batched_kmeans(
    x: Tensor,
    num_clusters: int,
    *,
    iters: int,
    init_centroids: Tensor | None = None,
    stop_when_stable: bool = True,
    seed: int = 0,
) -> KMeansResult:
    """Lloyd's algorithm on ``x [G, N, D]`` (any float dtype; treated as constant, no autograd).

    ``init_centroids [G, C, D]`` warm-starts the iterations (SVG2 passes the previous
    call's centroids); otherwise k-means++ seeding with ``seed``.  At most ``iters``
    iterations run; with ``stop_when_stable`` the loop ends as soon as no label changes
    (one host sync per iteration).
    """
    if x.dim() != 3:
        raise ValueError(f"x: expected [G, N, D], got shape {tuple(x.shape)}")
    g, n, d = x.shape
    if not isinstance(num_clusters, int) or isinstance(num_clusters, bool) or not 1 <= num_clusters <= n:
        raise ValueError(f"num_clusters: expected an int in [1, N={n}], got {num_clusters!r}")
    if not isinstance(iters, int) or isinstance(iters, bool) or iters < 1:
        raise ValueError(f"iters: expected an int >= 1, got {iters!r}")
    x = x.detach()
    if init_centroids is not None:
        if tuple(init_centroids.shape) != (g, num_clusters, d):
            raise ValueError(
                f"init_centroids: expected shape {(g, num_clusters, d)}, got {tuple(init_centroids.shape)}"
            )
        cent = init_centroids.detach().to(device=x.device, dtype=torch.float32).clone()
    else:
        gen = torch.Generator(device=x.device)
        gen.manual_seed(seed)
        cent = kmeans_plus_plus_init(x, num_clusters, generator=gen)

    labels = None
    converged = False
    it = 0
    sums = counts = None
    for it in range(1, iters + 1):
        new_labels = assign_labels(x, cent)
        stable = stop_when_stable and labels is not None and bool(torch.equal(new_labels, labels))
        labels = new_labels
        if stable:
            converged = True
            break  # the centroids already are the means of these labels
        sums, counts = _cluster_sums(x, labels, num_clusters)
        nonempty = counts > 0
        means = (sums / counts.clamp_min(1)[..., None].to(sums.dtype)).float()
        cent = torch.where(nonempty[..., None], means, cent)
    assert labels is not None and counts is not None and sums is not None
    # inertia = sum |x|^2 - sum_c n_c |mu_c|^2  (exact for cluster means), in fp64 for safety.
    sq = torch.zeros(g, dtype=torch.float64, device=x.device)
    step = _chunk_len(g, n, d)
    for s in range(0, n, step):
        sq += x[:, s : s + step].float().pow(2).sum(-1).double().sum(-1)
    s64 = sums.double()
    inertia = sq - (s64.pow(2).sum(-1) / counts.clamp_min(1).double()).sum(-1)
    return KMeansResult(
        labels=labels,
        centroids=cent,
        sizes=counts,
        inertia=inertia.clamp_min(0).float(),
        iterations=it,
        converged=converged,
    )
