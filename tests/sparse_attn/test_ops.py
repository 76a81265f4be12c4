"""The custom-op form of block-sparse attention: op contract, gradients, torch.compile, selective checkpointing."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from sparse_attn import ops
from sparse_attn.block_sparse import block_sparse_attention

from test_block_sparse import assert_close, dense_reference, make_mask, run_both


def _inputs(b, h, n, d, dtype, seed, layout="bhnd"):
    gen = torch.Generator().manual_seed(seed)
    shape = (b, h, n, d) if layout == "bhnd" else (b, n, h, d)
    return [torch.randn(shape, generator=gen, dtype=dtype) for _ in range(4)], gen


@pytest.mark.parametrize("backend,dtype,d,bs", [("torch", torch.float64, 16, 32), ("triton", torch.float32, 64, 64)])
def test_opcheck(backend, dtype, d, bs):
    """Schema, fake tensors, autograd registration and AOT dispatch of the forward op (and its backward)."""
    (q, k, v, _), gen = _inputs(2, 2, 100, d, dtype, 0)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    nb = math.ceil(100 / bs)
    mask = make_mask("per_head", 2, 2, nb, gen)
    kpm = torch.rand(2, 100, generator=gen) < 0.8
    tests = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    for padding in (None, kpm):
        torch.library.opcheck(
            torch.ops.sparse_attn.block_sparse_fwd.default,
            (q, k, v, mask, padding, None, None, None, None, bs, 0.25, backend, "bhnd", False),
            test_utils=tests,
        )


@pytest.mark.parametrize("kind", ["shared", "per_head", "batch_head", "nearly_empty"])
def test_torch_backend_through_op_matches_fp64_dense(kind):
    """The explicit torch forward/backward (no autograd inside the op) against fp64 dense attention."""
    (q, k, v, do), gen = _inputs(2, 3, 90, 8, torch.float64, 7)
    mask = make_mask(kind, 2, 3, math.ceil(90 / 32), gen)
    kpm = torch.rand(2, 90, generator=gen) < 0.8
    kpm[1] = False  # a batch entry without a single valid key: zeros, zero gradients
    ours, ref = run_both(q, k, v, do, mask, 32, "torch", kpm=kpm, scale=0.4)
    assert_close(ours, ref, 1e-10)
    assert torch.equal(ours[0][1], torch.zeros_like(ours[0][1])) and torch.equal(ours[1][1], torch.zeros_like(ours[1][1]))


@pytest.mark.parametrize("backend,dtype,d,bs,tol", [("torch", torch.float64, 8, 32, 1e-10), ("triton", torch.float32, 64, 64, 1e-5)])
def test_layout_bnhd_no_copy(backend, dtype, d, bs, tol):
    """[B, N, H, D] in, [B, N, H, D] out (contiguous), same numbers and gradients as the [B, H, N, D] call."""
    b, h, n = 2, 3, 150
    (q, k, v, do), gen = _inputs(b, h, n, d, dtype, 3, layout="bnhd")
    mask = make_mask("per_head", b, h, math.ceil(n / bs), gen)
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    out = block_sparse_attention(qg, kg, vg, mask, block_size=bs, backend=backend, layout="bnhd", scale=0.3)
    assert out.shape == (b, n, h, d) and out.is_contiguous()
    out.backward(do)
    assert all(g.is_contiguous() and g.shape == (b, n, h, d) for g in (qg.grad, kg.grad, vg.grad))
    t = functools.partial(torch.transpose, dim0=1, dim1=2)
    ours, ref = run_both(t(q), t(k), t(v), t(do), mask, bs, backend, scale=0.3)
    assert_close((t(out), t(qg.grad), t(kg.grad), t(vg.grad)), ref, tol)


@pytest.mark.parametrize("backend,layout", [("torch", "bhnd"), ("triton", "bhnd"), ("auto", "bnhd")])
def test_compile_fullgraph(backend, layout):
    """torch.compile(fullgraph=True) of a function around block_sparse_attention: no graph break, same grads."""
    torch._dynamo.reset()
    dtype, d, bs = (torch.float32, 64, 64) if backend == "triton" else (torch.float64, 16, 32)
    (q, k, v, do), gen = _inputs(1, 2, 96, d, dtype, 11, layout=layout)
    mask = make_mask("per_head", 1, 2, math.ceil(96 / bs), gen)

    def f(q, k, v):
        return block_sparse_attention(q * 1.5, k, v, mask, block_size=bs, backend=backend, layout=layout).sin()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    grads = []
    for fn in (f, compiled):
        qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
        out = fn(qg, kg, vg)
        out.backward(do)
        grads.append((out, qg.grad, kg.grad, vg.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def _policy(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in ops.CHECKPOINT_SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


@pytest.mark.parametrize("selective", [False, True])
def test_selective_checkpoint_skips_attention_recompute(selective):
    """With the policy saving CHECKPOINT_SAVE_OPS, backward does not run the attention forward again."""
    (q, k, v, do), gen = _inputs(1, 2, 64, 8, torch.float64, 5)
    mask = make_mask("per_head", 1, 2, 2, gen)
    w = torch.randn(8, 8, dtype=torch.float64, generator=gen, requires_grad=True)

    def block(x):
        return block_sparse_attention(x @ w, k, v, mask, block_size=32, backend="torch").relu() @ w

    kwargs = dict(context_fn=functools.partial(create_selective_checkpoint_contexts, _policy)) if selective else {}
    x = q.clone().requires_grad_()
    before = ops.forward_calls
    out = checkpoint(block, x, use_reentrant=False, **kwargs)
    assert ops.forward_calls == before + 1
    out.backward(do)
    assert ops.forward_calls == before + (1 if selective else 2)  # plain checkpointing re-runs attention

    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = dense_reference(xr @ wr, k, v, mask, 32).relu() @ wr
    ref.backward(do)
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(w.grad, wr.grad)


def test_checkpoint_save_ops_are_op_overloads():
    assert ops.CHECKPOINT_SAVE_OPS and all(isinstance(o, torch._ops.OpOverload) for o in ops.CHECKPOINT_SAVE_OPS)


def test_bad_layout():
    q = torch.randn(1, 2, 64, 8)
    with pytest.raises(ValueError, match="layout must be one of"):
        block_sparse_attention(q, q, q, torch.ones(2, 2, dtype=torch.bool), block_size=32, layout="bshd")


# ----------------------------------------------------------------------------------------- SVG2 range kernel op


def _range_case():
    from sparse_attn.kernels.range_attention import build_range_layout
    from sparse_attn.svg2 import _tile_config

    gen = torch.Generator().manual_seed(12)
    b, h, n, d = 1, 2, 60, 16
    q, k, v = (torch.randn(b, h, n, d, generator=gen) for _ in range(3))
    sel = torch.rand(b * h, 3, 4, generator=gen) < 0.6
    sel[:, :, 0] = True
    rs = torch.tensor([[20, 25, 15]] * (b * h))
    cs = torch.tensor([[10, 20, 20, 10]] * (b * h))
    layout = build_range_layout(sel, rs, cs, **_tile_config(q))
    return q, k, v, layout


def test_range_op_opcheck():
    q, k, v, layout = _range_case()
    tensors = [getattr(layout, f) for f in ops.RANGE_TENSOR_FIELDS]
    ints = [int(getattr(layout, f)) for f in ops.RANGE_INT_FIELDS]
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    torch.library.opcheck(torch.ops.sparse_attn.range_attn_fwd.default, (q, k, v, tensors, ints, 0.25),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_range_op_selective_checkpoint_skips_recompute():
    from sparse_attn.ops import range_attention
    from sparse_attn.svg2 import range_attention_torch

    q, k, v, layout = _range_case()
    w = torch.eye(16) + 0.1 * torch.randn(16, 16, generator=torch.Generator().manual_seed(1))
    w.requires_grad_()

    def block(x):
        return range_attention(x @ w, k, v, layout) @ w

    x = q.clone().requires_grad_()
    before = ops.forward_calls
    out = checkpoint(block, x, use_reentrant=False,
                     context_fn=functools.partial(create_selective_checkpoint_contexts, _policy))
    out.sum().backward()
    assert ops.forward_calls == before + 1
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    (range_attention_torch(xr @ wr, k, v, layout) @ wr).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.grad, wr.grad, rtol=1e-4, atol=1e-5)
