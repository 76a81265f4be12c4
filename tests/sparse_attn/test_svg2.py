"""Sparse VideoGen2 attention: k-means, routing, range kernel (Triton interpreter on CPU), torch path.

References are independent of the code under test: fp64 SDPA for dense equivalence and an
fp64 dense softmax under an explicit token-level mask built from the group map / routing.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

import sparse_attn.kmeans as km
from sparse_attn.kernels.range_attention import build_range_layout
from sparse_attn.ops import range_attention
from sparse_attn.svg2 import (
    SVG2Attention,
    SVG2State,
    _permutations,
    _plan,
    _tile_config,
    permute_tokens,
    range_attention_torch,
    svg2_attention,
)

HAS_CUDA = torch.cuda.is_available()
BACKENDS = ["torch", "triton"]


def _leaves(*shape, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g).to(device=device, dtype=dtype).requires_grad_() for _ in range(3)]


def _grads(out, leaves, go):
    return torch.autograd.grad(out, leaves, go)


def _masked_fp64(q, k, v, mask, go):
    """fp64 softmax(q k^T / sqrt(D)) v under a bool [B,H,N,N] mask; rows without keys -> 0. Returns out, grads."""
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    s = (qd @ kd.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    has = mask.any(-1, keepdim=True)
    s = s.masked_fill(~mask, float("-inf")).masked_fill(~has, 0.0)
    p = torch.softmax(s, -1) * has
    out = p @ vd
    return (out, *torch.autograd.grad(out, (qd, kd, vd), go.double()))


def _close(actual, expected, tol):
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= tol, f"max abs err {err:.3e} > {tol:.1e}"


def _group_ids(sizes, n):
    """Token -> group id per (b,h) for consecutive groups; tokens past the last group -> -1."""
    out = torch.full((sizes.shape[0], n), -1, dtype=torch.long)
    for i, row in enumerate(sizes.tolist()):
        pos = 0
        for gidx, s in enumerate(row):
            out[i, pos : pos + s] = gidx
            pos += s
    return out


def _token_mask(sel, row_sizes, col_sizes, b, h, n):
    rg, cg = _group_ids(row_sizes, n), _group_ids(col_sizes, n)
    mask = torch.zeros(b * h, n, n, dtype=torch.bool)
    for i in range(b * h):
        valid = (rg[i][:, None] >= 0) & (cg[i][None, :] >= 0)
        m = sel[i][rg[i].clamp_min(0)][:, cg[i].clamp_min(0)]
        mask[i] = m & valid
    return mask.view(b, h, n, n)


# ----------------------------------------------------------------------------------------------
# range kernel (Triton under the interpreter) vs fp64 reference on random layouts
# ----------------------------------------------------------------------------------------------
def _random_sizes(g, groups, n, gen, zero_frac=0.2):
    w = torch.rand(g, groups, generator=gen) ** 3  # skewed: many tiny groups
    w[torch.rand(g, groups, generator=gen) < zero_frac] = 0
    w[:, 0] += 1e-3
    s = (w / w.sum(-1, keepdim=True) * n).floor().long()
    s[:, 0] += n - s.sum(-1)
    return s


def _layout_case(name, g, n, gen):
    if name == "tiny_clusters":
        rs, cs = _random_sizes(g, 9, n, gen), _random_sizes(g, 13, n, gen)
        sel = torch.rand(g, 9, 13, generator=gen) < 0.35
    elif name == "one_huge":
        rs = torch.tensor([[n - 3, 1, 2, 0]] * g)
        cs = torch.tensor([[1, n - 5, 0, 4]] * g)
        sel = torch.rand(g, 4, 4, generator=gen) < 0.6
        sel[:, 0, 1] = True
    elif name == "empty_selections":
        rs, cs = _random_sizes(g, 6, n - 7, gen), _random_sizes(g, 5, n, gen)  # 7 uncovered query rows
        sel = torch.rand(g, 6, 5, generator=gen) < 0.5
        sel[:, 1] = False  # a query group that attends nothing
        sel[:, :, 2] = False  # a key group nobody attends
    else:
        raise AssertionError(name)
    return sel, rs, cs


@pytest.mark.parametrize("case", ["tiny_clusters", "one_huge", "empty_selections"])
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_range_attention_matches_fp64_reference(case, impl):
    b, h, n, d = 1, 2, 80, 16
    gen = torch.Generator().manual_seed({"tiny_clusters": 0, "one_huge": 1, "empty_selections": 2}[case])
    sel, rs, cs = _layout_case(case, b * h, n, gen)
    layout = build_range_layout(sel, rs, cs, tile_m=32, tile_n=16, chunk_m=16, chunk_n=16, dq_block_m=16)
    q, k, v = _leaves(b, h, n, d, seed=1)
    go = torch.randn(b, h, n, d, generator=gen)
    fn = range_attention if impl == "triton" else range_attention_torch
    out = fn(q, k, v, layout)
    grads = _grads(out, (q, k, v), go)
    mask = _token_mask(sel, rs, cs, b, h, n)
    ref = _masked_fp64(q, k, v, mask, go)
    for a, e in zip((out, *grads), ref):
        assert torch.isfinite(a).all()
        _close(a, e, 2e-5)
    no_keys = ~mask.any(-1)  # rows attending nothing: exact zeros, zero dQ
    no_queries = ~mask.any(-2)  # keys nobody attends: zero dK, dV
    if case == "empty_selections":
        assert no_keys.any() and no_queries.any()
    assert (out[no_keys] == 0).all() and (grads[0][no_keys] == 0).all()
    assert (grads[1][no_queries] == 0).all() and (grads[2][no_queries] == 0).all()


def test_range_kernel_fp16_and_head_dim_64():
    b, h, n, d = 1, 1, 72, 64
    gen = torch.Generator().manual_seed(3)
    sel, rs, cs = _layout_case("tiny_clusters", b * h, n, gen)
    layout = build_range_layout(sel, rs, cs, tile_m=32, tile_n=32, chunk_m=16, chunk_n=16)
    q, k, v = _leaves(b, h, n, d, seed=2, dtype=torch.float16)
    go = torch.randn(b, h, n, d, generator=gen).half()
    out = range_attention(q, k, v, layout)
    grads = _grads(out, (q, k, v), go)
    ref = _masked_fp64(q, k, v, _token_mask(sel, rs, cs, b, h, n), go)
    for a, e in zip((out, *grads), ref):
        assert a.dtype == torch.float16
        _close(a, e, 2e-2)


def test_layout_ranges_merge_adjacent_groups():
    sel = torch.tensor([[[True, False, True, True], [False, False, False, False]]])
    rs = torch.tensor([[3, 2]])
    cs = torch.tensor([[2, 3, 0, 4]])  # group 2 is empty: groups 2 and 3 are one run
    lay = build_range_layout(sel, rs, cs, tile_m=16, tile_n=16, chunk_m=16, chunk_n=16)
    assert lay.q_range_ptr.tolist() == [0, 2, 2]
    assert list(zip(lay.q_range_start.tolist(), lay.q_range_end.tolist())) == [(0, 2), (5, 9)]
    assert lay.num_pairs.tolist() == [3 * 6]
    with pytest.raises(ValueError, match="tile_m"):
        build_range_layout(sel, rs, cs, tile_m=24)


# ----------------------------------------------------------------------------------------------
# svg2_attention: dense equivalence
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_top_p_one_equals_dense(backend):
    b, h, n, d = 2, 2, 64, 32
    # non-contiguous inputs, as diffusers produces them ([B, N, H, D] transposed)
    base = _leaves(b, n, h, d, seed=4)
    q, k, v = (t.transpose(1, 2) for t in base)
    go = torch.randn(b, h, n, d, generator=torch.Generator().manual_seed(5))
    out, state = svg2_attention(q, k, v, num_q_clusters=5, num_k_clusters=7, top_p=1.0, min_kc_ratio=0.0,
                                text_tokens=8, backend=backend)
    grads = _grads(out, base, go)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(qd, kd, vd)
    ref_grads = torch.autograd.grad(ref, (qd, kd, vd), go.double())
    _close(out, ref, 1e-5)
    for a, e in zip(grads, ref_grads):
        _close(a.transpose(1, 2), e, 1e-5)
    assert state.density == pytest.approx(1.0)


def test_min_kc_ratio_one_equals_dense():
    q, k, v = _leaves(1, 2, 48, 16, seed=6)
    out, state = svg2_attention(q, k, v, num_q_clusters=4, num_k_clusters=6, top_p=0.2, min_kc_ratio=1.0,
                                backend="torch")
    _close(out, F.scaled_dot_product_attention(*(t.double() for t in (q, k, v))), 1e-5)
    assert state.density == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------------
# svg2_attention: sparse routing vs an independent masked reference
# ----------------------------------------------------------------------------------------------
def _reference_selection(cq, ck, k_sizes, top_p, min_kc_ratio):
    """Per-row python implementation of the official rule (independent of svg2._select)."""
    g, nq, nk = cq.shape[0], cq.shape[1], ck.shape[1]
    sel = torch.zeros(g, nq, nk, dtype=torch.bool)
    min_k = int(min_kc_ratio * nk)
    for i in range(g):
        s = (cq[i].double() @ ck[i].double().T) / math.sqrt(cq.shape[-1])
        for r in range(nq):
            w = [k_sizes[i, j].item() * math.exp(s[r, j].item()) for j in range(nk)]
            tot = sum(w)
            order = sorted(range(nk), key=lambda j: -w[j])
            acc = 0.0
            for rank, j in enumerate(order):
                if k_sizes[i, j] == 0:
                    continue
                if acc < top_p or rank < min_k:
                    sel[i, r, j] = True
                acc += w[j] / tot
    return sel


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_routing_matches_masked_reference(backend):
    b, h, n, d, text = 2, 2, 72, 16, 8
    q, k, v = _leaves(b, h, n, d, seed=7)
    kpm = torch.ones(b, n, dtype=torch.bool)
    kpm[0, -3:] = False
    kpm[1, -6] = False  # a hole in the middle of the text
    go = torch.randn(b, h, n, d, generator=torch.Generator().manual_seed(8))
    kwargs = dict(num_q_clusters=6, num_k_clusters=10, top_p=0.6, min_kc_ratio=0.2)
    out, state = svg2_attention(q, k, v, text_tokens=text, key_padding_mask=kpm, backend=backend, **kwargs)
    grads = _grads(out, (q, k, v), go)

    plan = _plan(q.detach(), k.detach(), kmeans_iters=None, state=None, text_tokens=text, key_padding_mask=kpm,
                 tiles=_tile_config(q), stage=lambda s: contextlib.nullcontext(), **kwargs)
    ql, kl = plan.extras["q_labels"], plan.extras["k_labels"]
    k_sizes = state.k_cluster_sizes.view(b * h, -1)
    sel = _reference_selection(state.q_centroids.view(b * h, 6, d), state.k_centroids.view(b * h, 10, d),
                               k_sizes, 0.6, 0.2)
    assert torch.equal(sel, plan.extras["selection"])
    assert torch.equal(state.k_cluster_sizes.view(b * h, -1), torch.stack([torch.bincount(x, minlength=10) for x in kl]))
    nv = n - text
    mask = torch.zeros(b * h, n, n, dtype=torch.bool)
    for i in range(b * h):
        mask[i, :nv, :nv] = sel[i][ql[i]][:, kl[i]]
        mask[i, :, nv:] = True
        mask[i, nv:, :] = True
        mask[i] &= kpm[i // h][None, :]
    mask = mask.view(b, h, n, n)
    ref = _masked_fp64(q, k, v, mask, go)
    for a, e in zip((out, *grads), ref):
        _close(a, e, 2e-5)
    assert (grads[1][~kpm[:, None, :].expand(b, h, n)] == 0).all()  # padded keys: zero gradient
    expected_density = mask.double().sum((-1, -2)) / n**2
    _close(state.density_per_head, expected_density, 1e-6)
    assert 0.0 < state.density < 1.0


def test_text_tokens_with_padding_top_p_one_equals_masked_dense():
    b, h, n, d, text = 2, 1, 40, 16, 10
    q, k, v = _leaves(b, h, n, d, seed=9)
    kpm = torch.ones(b, n, dtype=torch.bool)
    kpm[1, -4:] = False
    out, _ = svg2_attention(q, k, v, num_q_clusters=3, num_k_clusters=4, top_p=1.0, text_tokens=text,
                            key_padding_mask=kpm, backend="torch")
    ref = F.scaled_dot_product_attention(*(t.double() for t in (q, k, v)), attn_mask=kpm[:, None, None, :])
    _close(out, ref, 1e-5)


# ----------------------------------------------------------------------------------------------
# permutation
# ----------------------------------------------------------------------------------------------
def test_permutation_round_trip_and_gradient():
    b, h, n, d, text = 2, 3, 30, 4, 6
    gen = torch.Generator().manual_seed(10)
    ql = torch.randint(0, 5, (b * h, n - text), generator=gen)
    kl = torch.randint(0, 7, (b * h, n - text), generator=gen)
    kpm = torch.ones(b, n, dtype=torch.bool)
    kpm[0, n - 5] = False
    qp, qi, kp, ki = _permutations(ql, kl, b, h, n, text, kpm)
    x = torch.randn(b, h, n, d, generator=gen, requires_grad=True)
    y = permute_tokens(x, qp, qi)
    assert torch.equal(permute_tokens(y, qi, qp), x)
    # labels sorted, stable (ties keep original order), text last; padded text keys after valid ones
    sorted_q = torch.gather(ql.view(b, h, -1), -1, qp[..., : n - text])
    assert (sorted_q.diff(dim=-1) >= 0).all()
    same = sorted_q.diff(dim=-1) == 0
    assert (qp[..., 1 : n - text].sub(qp[..., : n - text - 1])[same] > 0).all()
    assert torch.equal(qp[..., n - text :], torch.arange(n - text, n).expand(b, h, text))
    assert kp[0, :, -1].eq(n - 5).all() and kp[1, :, n - text :].equal(torch.arange(n - text, n).expand(h, text))
    g = torch.randn(b, h, n, d, generator=gen)
    (gx,) = torch.autograd.grad(y, x, g)
    bi, hi = torch.arange(b)[:, None, None], torch.arange(h)[None, :, None]
    x2 = x.detach().clone().requires_grad_()
    (gx_ref,) = torch.autograd.grad(x2[bi, hi, qp], x2, g)  # autograd of advanced indexing
    assert torch.equal(gx, gx_ref)


# ----------------------------------------------------------------------------------------------
# k-means
# ----------------------------------------------------------------------------------------------
def _planted(g, n, c, d, spread, gen, noise=1.0):
    centers = torch.randn(g, c, d, generator=gen) * spread
    labels = torch.randint(0, c, (g, n), generator=gen)
    labels[:, :c] = torch.arange(c)  # every cluster non-empty
    x = torch.gather(centers, 1, labels[..., None].expand(g, n, d)) + noise * torch.randn(g, n, d, generator=gen)
    return x, labels


def test_kmeans_finds_planted_clusters():
    gen = torch.Generator().manual_seed(11)
    x, truth = _planted(3, 400, 6, 8, spread=10.0, gen=gen, noise=0.5)
    res = km.batched_kmeans(x, 6, iters=50)
    assert res.converged and res.iterations < 50
    for i in range(3):
        pairs = torch.unique(torch.stack([truth[i], res.labels[i]]), dim=1)
        assert pairs.shape[1] == 6  # a bijection between planted and found clusters
    assert torch.equal(res.sizes, torch.stack([torch.bincount(l, minlength=6) for l in res.labels]))
    means = torch.stack([torch.stack([x[i][res.labels[i] == c].mean(0) for c in range(6)]) for i in range(3)])
    _close(res.centroids, means, 1e-4)
    inertia = torch.stack([(x[i] - res.centroids[i][res.labels[i]]).pow(2).sum() for i in range(3)])
    _close(res.inertia / inertia, torch.ones(3), 1e-4)


def test_kmeans_chunked_assignment_matches_bruteforce(monkeypatch):
    monkeypatch.setattr(km, "_SCORE_BUDGET", 64)  # force many chunks
    gen = torch.Generator().manual_seed(12)
    x, c = torch.randn(2, 50, 5, generator=gen), torch.randn(2, 7, 5, generator=gen)
    assert torch.equal(km.assign_labels(x, c), torch.cdist(x.double(), c.double()).argmin(-1))


def test_kmeans_update_paths_agree():
    gen = torch.Generator().manual_seed(23)
    x = torch.randn(3, 70, 6, generator=gen)
    labels = torch.randint(0, 5, (3, 70), generator=gen)
    s_mm, c_mm = km._cluster_sums(x, labels, 5, use_matmul=True)  # the CUDA path (one-hot matmul)
    s_ix, c_ix = km._cluster_sums(x, labels, 5, use_matmul=False)
    ref = torch.stack([torch.stack([x[i][labels[i] == c].sum(0) for c in range(5)]) for i in range(3)])
    _close(s_mm, ref, 1e-5)
    _close(s_ix, ref, 1e-5)
    assert torch.equal(c_mm, c_ix) and torch.equal(c_mm, torch.stack([torch.bincount(l, minlength=5) for l in labels]))


def test_kmeans_warm_start_needs_fewer_iterations():
    gen = torch.Generator().manual_seed(13)
    x, _ = _planted(2, 600, 12, 8, spread=1.5, gen=gen)  # overlapping clusters: cold needs many steps
    first = km.batched_kmeans(x, 12, iters=100)
    x2 = x + 0.05 * torch.randn(x.shape, generator=gen)  # "next step" of the same layer
    cold = km.batched_kmeans(x2, 12, iters=100)
    warm = km.batched_kmeans(x2, 12, iters=100, init_centroids=first.centroids)
    assert cold.converged and warm.converged
    assert warm.iterations < cold.iterations
    assert (warm.inertia <= cold.inertia * 1.02).all()


def test_kmeans_identical_points_and_bad_args():
    x = torch.ones(2, 10, 3)
    res = km.batched_kmeans(x, 4, iters=5)
    assert torch.isfinite(res.centroids).all() and res.sizes.sum(-1).tolist() == [10, 10]
    assert res.inertia.abs().max() < 1e-6
    with pytest.raises(ValueError, match="num_clusters"):
        km.batched_kmeans(x, 11, iters=5)
    with pytest.raises(ValueError, match="init_centroids"):
        km.batched_kmeans(x, 4, iters=5, init_centroids=torch.zeros(2, 3, 3))


# ----------------------------------------------------------------------------------------------
# statistics, state, degenerate inputs
# ----------------------------------------------------------------------------------------------
def _structured_qk(b, h, n, d, gen, groups=8):
    proto = torch.randn(groups, d, generator=gen) * 2.0
    ids = torch.randint(0, groups, (b, h, n), generator=gen)
    q = proto[ids] + 0.3 * torch.randn(b, h, n, d, generator=gen)
    k = proto[ids] + 0.3 * torch.randn(b, h, n, d, generator=gen)
    return q, k, torch.randn(b, h, n, d, generator=gen)


def test_density_falls_as_top_p_falls():
    gen = torch.Generator().manual_seed(14)
    q, k, v = _structured_qk(1, 2, 128, 16, gen)
    dens = []
    for p in (1.0, 0.95, 0.8, 0.5, 0.2):
        _, st = svg2_attention(q, k, v, num_q_clusters=8, num_k_clusters=16, top_p=p, min_kc_ratio=0.0,
                               backend="torch")
        dens.append(st.density)
    assert dens[0] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(dens, dens[1:])), dens
    assert dens[-1] < 0.5 * dens[0], dens


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_warm_start_and_module(backend):
    gen = torch.Generator().manual_seed(15)
    q, k, v = _structured_qk(1, 2, 64, 16, gen)
    mod = SVG2Attention(6, 10, top_p=0.8, backend=backend)
    mod(q, k, v)
    s1 = mod.state
    assert isinstance(s1, SVG2State) and not s1.warm_started and s1.calls == 1
    assert s1.q_centroids.shape == (1, 2, 6, 16) and s1.k_cluster_sizes.sum(-1).eq(64).all()
    out = mod(q + 0.01 * torch.randn(q.shape, generator=gen), k, v)
    assert mod.state.warm_started and mod.state.calls == 2 and max(mod.state.kmeans_iterations) <= 2
    assert torch.isfinite(out).all()
    # a state of another shape is ignored (cold start), not an error
    _, st = svg2_attention(q[:, :1], k[:, :1], v[:, :1], num_q_clusters=6, num_k_clusters=10, state=s1,
                           backend=backend)
    assert not st.warm_started
    mod.reset_state()
    assert mod.state is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_degenerate_inputs(backend):
    gen = torch.Generator().manual_seed(16)
    n, d = 12, 16
    # N smaller than the cluster counts (clamped) with top_p=1: exactly dense
    q, k, v = _leaves(1, 1, n, d, seed=17)
    out, st = svg2_attention(q, k, v, top_p=1.0, backend=backend)  # defaults 100 / 500 clusters
    assert st.q_centroids.shape[2] == n and st.k_centroids.shape[2] == n
    _close(out, F.scaled_dot_product_attention(*(t.double() for t in (q, k, v))), 1e-5)
    out, st = svg2_attention(q, k, v, top_p=0.5, backend=backend)
    assert torch.isfinite(out).all() and 0 < st.density < 1
    # identical tokens: one non-empty cluster on each side -> uniform average of v
    qi = torch.ones(1, 2, n, d, requires_grad=True)
    ki = torch.ones(1, 2, n, d, requires_grad=True)
    vi = torch.randn(1, 2, n, d, generator=gen, requires_grad=True)
    out, st = svg2_attention(qi, ki, vi, num_q_clusters=4, num_k_clusters=4, top_p=0.3, backend=backend)
    _close(out, vi.detach().mean(2, keepdim=True).expand_as(out), 1e-5)
    out.sum().backward()
    for t in (qi, ki, vi):
        assert torch.isfinite(t.grad).all()
    assert st.density == pytest.approx(1.0)
    # a single cluster per side: every query attends everything whatever top_p is
    q, k, v = _leaves(1, 2, 40, d, seed=18)
    go = torch.randn(1, 2, 40, d, generator=gen)
    out, st = svg2_attention(q, k, v, num_q_clusters=1, num_k_clusters=1, top_p=0.1, text_tokens=5,
                             backend=backend)
    ref = _masked_fp64(q, k, v, torch.ones(1, 2, 40, 40, dtype=torch.bool), go)
    for a, e in zip((out, *_grads(out, (q, k, v), go)), ref):
        _close(a, e, 1e-5)


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------
_Q = torch.randn(1, 2, 16, 8)


@pytest.mark.parametrize(
    "kwargs, arg",
    [
        (dict(num_q_clusters=0), "num_q_clusters"),
        (dict(num_k_clusters=-1), "num_k_clusters"),
        (dict(num_k_clusters=2.0), "num_k_clusters"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(min_kc_ratio=-0.1), "min_kc_ratio"),
        (dict(min_kc_ratio=1.01), "min_kc_ratio"),
        (dict(kmeans_iters=0), "kmeans_iters"),
        (dict(backend="cuda"), "backend"),
        (dict(text_tokens=16), "text_tokens"),
        (dict(text_tokens=-1), "text_tokens"),
        (dict(key_padding_mask=torch.ones(1, 15, dtype=torch.bool)), "key_padding_mask"),
        (dict(key_padding_mask=torch.ones(1, 16)), "key_padding_mask"),
        (dict(text_tokens=4, key_padding_mask=torch.arange(16)[None] != 3), "key_padding_mask"),
        (dict(k=torch.randn(1, 2, 15, 8)), "k"),
        (dict(v=torch.randn(1, 2, 16, 8).double()), "v"),
        (dict(q=torch.randn(2, 16, 8)), "q"),
        (dict(q=torch.randint(0, 3, (1, 2, 16, 8))), "q"),
        (dict(backend="triton", q=_Q.double(), k=_Q.double(), v=_Q.double()), "backend"),
        (dict(backend="triton", q=torch.randn(1, 2, 16, 12), k=torch.randn(1, 2, 16, 12), v=torch.randn(1, 2, 16, 12)), "backend"),
    ],
)
def test_bad_inputs(kwargs, arg):
    q, k, v = kwargs.pop("q", _Q), kwargs.pop("k", _Q), kwargs.pop("v", _Q)
    with pytest.raises(ValueError, match=arg):
        svg2_attention(q, k, v, **kwargs)


def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch):
    x = torch.randn(1, 1, 16, 16)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        svg2_attention(x, x, x, backend="triton")
    bf = x.bfloat16()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ValueError, match="bf16"):
        svg2_attention(bf, bf, bf, backend="triton")


def test_bad_state_type():
    with pytest.raises(TypeError, match="state"):
        svg2_attention(_Q, _Q, _Q, state={"q_centroids": None})
    with pytest.raises(ValueError, match="top_p"):
        SVG2Attention(top_p=2.0)


# ----------------------------------------------------------------------------------------------
# GPU tier: bf16 Triton on real hardware
# ----------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_top_p_one_equals_dense(dtype):
    b, h, n, d = 1, 4, 1000, 128
    q, k, v = _leaves(b, h, n, d, seed=19, dtype=dtype, device="cuda")
    go = torch.randn(b, h, n, d, device="cuda", dtype=dtype)
    out, _ = svg2_attention(q, k, v, num_q_clusters=20, num_k_clusters=50, top_p=1.0, text_tokens=40)
    grads = _grads(out, (q, k, v), go)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(qd, kd, vd)
    ref_grads = torch.autograd.grad(ref, (qd, kd, vd), go.double())
    for a, e in zip((out, *grads), (ref, *ref_grads)):
        rel = (a.double() - e).norm() / e.norm()
        assert rel < 2e-2, rel


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["tiny_clusters", "one_huge", "empty_selections"])
def test_gpu_range_kernel_bf16_matches_fp64_reference(case):
    b, h, n, d = 1, 2, 700, 128
    gen = torch.Generator().manual_seed(21)
    sel, rs, cs = _layout_case(case, b * h, n, gen)
    q, k, v = _leaves(b, h, n, d, seed=22, dtype=torch.bfloat16, device="cuda")
    layout = build_range_layout(sel.cuda(), rs.cuda(), cs.cuda(), **_tile_config(q))
    go = torch.randn(b, h, n, d, generator=gen).to("cuda", torch.bfloat16)
    out = range_attention(q, k, v, layout)
    grads = _grads(out, (q, k, v), go)
    ref = _masked_fp64(q.cpu(), k.cpu(), v.cpu(), _token_mask(sel, rs, cs, b, h, n), go.cpu())
    for a, e in zip((out, *grads), ref):
        assert torch.isfinite(a).all()
        rel = (a.cpu().double() - e).norm() / e.norm().clamp_min(1e-12)
        assert rel < 2e-2, rel


@pytest.mark.gpu
def test_gpu_sparse_triton_matches_torch_path():
    gen = torch.Generator().manual_seed(20)
    q, k, v = (t.cuda() for t in _structured_qk(1, 2, 700, 64, gen))
    plan = _plan(q, k, num_q_clusters=12, num_k_clusters=30, top_p=0.7, min_kc_ratio=0.1, kmeans_iters=None,
                 state=None, text_tokens=20, key_padding_mask=None, tiles=_tile_config(q),
                 stage=lambda s: contextlib.nullcontext())
    qp, kp, vp = (permute_tokens(t, plan.q_perm if t is q else plan.k_perm,
                                 plan.q_inv if t is q else plan.k_inv).detach().requires_grad_() for t in (q, k, v))
    go = torch.randn_like(qp)
    out_t = range_attention(qp, kp, vp, plan.layout)
    out_r = range_attention_torch(qp, kp, vp, plan.layout)
    for a, e in zip((out_t, *_grads(out_t, (qp, kp, vp), go)), (out_r, *_grads(out_r, (qp, kp, vp), go))):
        _close(a, e, 2e-4 * max(1.0, e.abs().max().item()))
