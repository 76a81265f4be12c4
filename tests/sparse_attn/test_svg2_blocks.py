"""SVG2 routing as 128-blocks (the FA4 path): block classification and exactness against fp64 references."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

from sparse_attn.backends import fa4
from sparse_attn.svg2 import _plan, blocks_attention, permute_tokens, svg2_attention
from sparse_attn.svg2_blocks import group_blocks

from test_svg2 import _grads, _layout_case, _leaves, _masked_fp64, _token_mask


@pytest.mark.parametrize("case", ["tiny_clusters", "one_huge", "empty_selections"])
@pytest.mark.parametrize("n,bs", [(100, 16), (300, 128), (200, 32)])
def test_group_blocks_match_token_mask(case, n, bs):
    """Skipped / full / partial per block pair exactly as the token-level mask says (real tokens only)."""
    g = 3
    gen = torch.Generator().manual_seed(n + bs)
    sel, rs, cs = _layout_case(case, g, n, gen)
    gb = group_blocks(sel, rs, cs, n, bs)
    tok = _token_mask(sel, rs, cs, g, 1, n).view(g, n, n)
    nb = math.ceil(n / bs)
    for i in range(g):
        for a in range(nb):
            for c in range(nb):
                blk = tok[i, a * bs : (a + 1) * bs, c * bs : (c + 1) * bs]
                assert bool(gb.block_mask[i, a, c]) == bool(blk.any()), (i, a, c)
                assert bool(gb.partial[i, a, c]) == bool(blk.any() and not blk.all()), (i, a, c)
        # the token mask the partial blocks apply: pairs[q_group, k_group], padding groups never selected
        qg, kg = gb.q_groups[i].long(), gb.k_groups[i].long()
        assert torch.equal(gb.pairs[i][qg[:n]][:, kg[:n]], tok[i])
        assert not gb.pairs[i][qg[n:]].any() and not gb.pairs[i][:, kg[n:]].any()


def _routing(q, k, kpm, text, **kwargs):
    plan = _plan(q.detach(), k.detach(), kmeans_iters=None, state=None, text_tokens=text, key_padding_mask=kpm,
                 tiles=None, stage=lambda s: contextlib.nullcontext(), **kwargs)
    return plan


def _reference_mask(plan, kpm, b, h, n, text):
    ql, kl, sel = plan.extras["q_labels"], plan.extras["k_labels"], plan.extras["selection"]
    nv = n - text
    mask = torch.zeros(b * h, n, n, dtype=torch.bool)
    for i in range(b * h):
        mask[i, :nv, :nv] = sel[i][ql[i]][:, kl[i]]
        mask[i, :, nv:] = True
        mask[i, nv:, :] = True
        if kpm is not None:
            mask[i] &= kpm[i // h][None, :]
    return mask.view(b, h, n, n)


def _blocks_run(q, k, v, plan, backend):
    qp = permute_tokens(q, plan.q_perm, plan.q_inv)
    kp = permute_tokens(k, plan.k_perm, plan.k_inv)
    vp = permute_tokens(v, plan.k_perm, plan.k_inv)
    return permute_tokens(blocks_attention(qp, kp, vp, plan.blocks, backend=backend), plan.q_inv, plan.q_perm)


def test_block_path_matches_masked_reference_with_text_and_padding():
    """The whole FA4-path mapping (permutation, blocks, partial token mask) on the torch backend vs fp64."""
    b, h, n, d, text = 2, 2, 300, 16, 24
    q, k, v = _leaves(b, h, n, d, seed=31, dtype=torch.float64)
    kpm = torch.ones(b, n, dtype=torch.bool)
    kpm[0, -5:] = False
    kpm[1, -15] = False
    go = torch.randn(b, h, n, d, generator=torch.Generator().manual_seed(32), dtype=torch.float64)
    plan = _routing(q, k, kpm, text, num_q_clusters=9, num_k_clusters=14, top_p=0.6, min_kc_ratio=0.1)
    assert plan.layout is None and plan.blocks.partial.any()  # the path under test has partial blocks
    out = _blocks_run(q, k, v, plan, "torch")
    ref = _masked_fp64(q, k, v, _reference_mask(plan, kpm, b, h, n, text), go)
    for a, e in zip((out, *_grads(out, (q, k, v), go)), ref):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-10)
    dens = _reference_mask(plan, kpm, b, h, n, text).double().sum((-1, -2)) / n**2
    torch.testing.assert_close(plan.state.density_per_head.double(), dens.view(b, h), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("top_p,min_kc", [(1.0, 0.1), (0.3, 1.0)])
def test_block_path_top_p_one_is_dense(top_p, min_kc):
    """top_p=1 or min_kc_ratio=1: every kept block is full (no token mask) and the result is dense attention."""
    b, h, n, d, text = 1, 2, 270, 16, 14
    q, k, v = _leaves(b, h, n, d, seed=33, dtype=torch.float64)
    go = torch.randn(b, h, n, d, generator=torch.Generator().manual_seed(34), dtype=torch.float64)
    plan = _routing(q, k, None, text, num_q_clusters=7, num_k_clusters=11, top_p=top_p, min_kc_ratio=min_kc)
    assert plan.blocks.block_mask.all() and not plan.blocks.partial.any()
    out = _blocks_run(q, k, v, plan, "torch")
    qd, kd, vd = (t.detach().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(qd, kd, vd)
    for a, e in zip((out, *_grads(out, (q, k, v), go)), (ref, *_grads(ref, (qd, kd, vd), go))):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-10)


def test_fa4_backend_unavailable_is_one_error():
    if fa4.installed():
        pytest.skip("flash-attn-4 is installed here")
    q, k, v = _leaves(1, 1, 40, 16)
    with pytest.raises(ImportError, match=r"^backend: 'fa4': flash-attn-4 is not importable"):
        svg2_attention(q, k, v, num_q_clusters=3, num_k_clusters=4, backend="fa4")


_needs_fa4 = pytest.mark.skipif(not (torch.cuda.is_available() and fa4.installed()), reason="needs CUDA and flash-attn-4")


@pytest.mark.gpu
@_needs_fa4
def test_gpu_svg2_fa4_matches_fp64():
    """bf16 FA4 path (partial blocks through the cluster-id mask_mod) with text and key padding, N=1000 (ragged
    tail block), against fp64 attention under the same routing's token mask."""
    b, h, n, d, text = 1, 4, 1000, 128, 40
    q, k, v = _leaves(b, h, n, d, seed=35, dtype=torch.bfloat16, device="cuda")
    kpm = torch.ones(b, n, dtype=torch.bool, device="cuda")
    kpm[0, -7:] = False
    go = torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16)
    plan = _routing(q, k, kpm, text, num_q_clusters=20, num_k_clusters=50, top_p=0.6, min_kc_ratio=0.1)
    assert plan.blocks.partial.any()
    out = _blocks_run(q, k, v, plan, "fa4")
    grads = _grads(out, (q, k, v), go)
    plan.extras = {key: val.cpu() for key, val in plan.extras.items()}
    ref = _masked_fp64(q.cpu(), k.cpu(), v.cpu(), _reference_mask(plan, kpm.cpu(), b, h, n, text), go.cpu())
    for a, e in zip((out, *grads), ref):
        assert torch.isfinite(a).all()
        rel = (a.cpu().double() - e).norm() / e.norm().clamp_min(1e-12)
        assert rel < 2e-2, rel


@pytest.mark.gpu
@_needs_fa4
def test_gpu_svg2_fa4_top_p_one_equals_dense():
    b, h, n, d = 1, 4, 1000, 128
    q, k, v = _leaves(b, h, n, d, seed=36, dtype=torch.bfloat16, device="cuda")
    go = torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16)
    out, _ = svg2_attention(q, k, v, num_q_clusters=20, num_k_clusters=50, top_p=1.0, text_tokens=40, backend="fa4")
    grads = _grads(out, (q, k, v), go)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(qd, kd, vd)
    for a, e in zip((out, *grads), (ref, *_grads(ref, (qd, kd, vd), go.double()))):
        rel = (a.double() - e).norm() / e.norm()
        assert rel < 2e-2, rel
