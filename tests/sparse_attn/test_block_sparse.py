"""block_sparse_attention against an fp64 dense masked reference, both backends; index cache; bad input.

On CPU the Triton kernels run under TRITON_INTERPRET=1 (set by tests/conftest.py), so shapes stay tiny.
The `gpu` test compares bf16 at a realistic size with F.scaled_dot_product_attention on a slice of rows.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sparse_attn import indices as indices_mod
from sparse_attn import reference as reference_mod
from sparse_attn.block_sparse import block_sparse_attention
from sparse_attn.indices import block_index
from sparse_attn.kernels import block_sparse as kernels_mod
from sparse_attn.kernels.block_sparse import KernelConfig, block_sparse_backward, block_sparse_forward

# ----------------------------------------------------------------------------------------- reference


def dense_reference(q, k, v, block_mask, block_size, scale=None, key_padding_mask=None):
    """fp64 softmax attention over the kept keys only; rows without a kept key give 0."""
    b, h, n, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    nb = math.ceil(n / block_size)
    m = block_mask.reshape((1,) * (4 - block_mask.dim()) + tuple(block_mask.shape)).expand(b, h, nb, nb)
    tok = m.repeat_interleave(block_size, -1).repeat_interleave(block_size, -2)[..., :n, :n]
    if key_padding_mask is not None:
        tok = tok & key_padding_mask[:, None, None, :]
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    s = s.masked_fill(~tok, float("-inf"))
    mx = s.amax(-1, keepdim=True)
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    p = torch.exp(s - mx)
    denom = p.sum(-1, keepdim=True)
    return (p @ v.double()) / torch.where(denom == 0, torch.ones_like(denom), denom)


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def run_both(q, k, v, do, mask, bs, backend, kpm=None, scale=None):
    """(ours: out, dq, dk, dv), (fp64 reference: out, dq, dk, dv)."""
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = block_sparse_attention(q, k, v, mask, block_size=bs, backend=backend, key_padding_mask=kpm, scale=scale)
    out.backward(do)
    qr, kr, vr = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = dense_reference(qr, kr, vr, mask, bs, scale, kpm)
    ref.backward(do.double())
    grads = [g if g is not None else torch.zeros_like(x) for g, x in zip((q.grad, k.grad, v.grad), (q, k, v))]
    return (out, *grads), (ref, qr.grad, kr.grad, vr.grad)


def assert_close(ours, ref, tol):
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, ref):
        assert torch.isfinite(a).all(), f"{name} has non-finite values"
        err = rel(a, b)
        assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.0e}"


def make_mask(kind, b, h, nb, gen):
    if kind == "shared":
        m = torch.rand(nb, nb, generator=gen) < 0.5
    elif kind == "per_head":
        m = torch.rand(h, nb, nb, generator=gen) < 0.5
    elif kind == "batch":
        m = torch.rand(b, 1, nb, nb, generator=gen) < 0.5
    elif kind == "batch_head":
        m = torch.rand(b, h, nb, nb, generator=gen) < 0.5
    elif kind == "dense":
        m = torch.ones(nb, nb, dtype=torch.bool)
    elif kind == "nearly_empty":
        m = torch.zeros(h, nb, nb, dtype=torch.bool)
        m[0, nb - 1, 0] = True  # one block in the whole mask
    else:
        raise AssertionError(kind)
    if kind in ("shared", "per_head", "batch", "batch_head"):
        m[..., 1, :] = False  # an empty query-block row
    return m


# ----------------------------------------------------------------------------------------- torch path


@pytest.mark.parametrize(
    "b,h,n,d,bs,kind,dtype",
    [
        (1, 1, 50, 8, 16, "shared", torch.float64),
        (2, 3, 100, 24, 32, "per_head", torch.float64),
        (2, 3, 77, 16, 16, "batch", torch.float32),
        (1, 3, 64, 8, 32, "batch_head", torch.float64),
        (2, 1, 90, 8, 16, "dense", torch.float64),
        (1, 3, 70, 8, 16, "nearly_empty", torch.float64),
    ],
)
def test_torch_backend_matches_dense(b, h, n, d, bs, kind, dtype):
    gen = torch.Generator().manual_seed(n * 7 + d)
    q, k, v, do = (torch.randn(b, h, n, d, generator=gen, dtype=dtype) for _ in range(4))
    mask = make_mask(kind, b, h, math.ceil(n / bs), gen)
    ours, ref = run_both(q, k, v, do, mask, bs, "torch")
    assert_close(ours, ref, 1e-10 if dtype == torch.float64 else 1e-5)


def test_torch_backend_chunked(monkeypatch):
    """Tiny chunk budget: many chunks (forward and explicit backward); same numbers as the dense reference."""
    monkeypatch.setattr(reference_mod, "_CHUNK_ELEMENTS", 2000)
    gen = torch.Generator().manual_seed(3)
    q, k, v, do = (torch.randn(2, 2, 75, 8, generator=gen, dtype=torch.float64) for _ in range(4))
    mask = make_mask("per_head", 2, 2, 5, gen)
    kpm = torch.rand(2, 75, generator=gen) < 0.7
    ours, ref = run_both(q, k, v, do, mask, 16, "torch", kpm=kpm, scale=0.3)
    assert_close(ours, ref, 1e-10)


# ----------------------------------------------------------------------------------------- triton path


@pytest.mark.parametrize(
    "b,h,n,d,bs,kind,dtype",
    [
        (1, 3, 200, 64, 64, "per_head", torch.float32),
        (2, 1, 300, 128, 128, "shared", torch.float16),
        (2, 3, 150, 64, 64, "batch", torch.float32),
        (1, 1, 256, 64, 128, "dense", torch.float32),
        (1, 3, 130, 64, 64, "nearly_empty", torch.float32),
        (2, 2, 192, 128, 64, "batch_head", torch.float16),
    ],
)
def test_triton_matches_dense(b, h, n, d, bs, kind, dtype):
    gen = torch.Generator().manual_seed(n + d + b)
    q, k, v, do = (torch.randn(b, h, n, d, generator=gen).to(dtype) for _ in range(4))
    mask = make_mask(kind, b, h, math.ceil(n / bs), gen)
    ours, ref = run_both(q, k, v, do, mask, bs, "triton")
    assert_close(ours, ref, 1e-5 if dtype == torch.float32 else 3e-3)


@pytest.mark.parametrize("backend,bs,d", [("triton", 64, 64), ("torch", 16, 8)])
def test_key_padding_mask_and_empty_rows(backend, bs, d):
    """Padded keys never enter the softmax; rows without a valid key are 0 with zero gradients."""
    b, h, n = 2, 2, 150
    gen = torch.Generator().manual_seed(11)
    q, k, v, do = (torch.randn(b, h, n, d, generator=gen) for _ in range(4))
    nb = math.ceil(n / bs)
    mask = torch.rand(h, nb, nb, generator=gen) < 0.6
    mask[:, :, 0] = True
    mask[1, 0, :] = False  # head 1, query block 0: no kept block
    kpm = torch.rand(b, n, generator=gen) < 0.7
    kpm[1] = False  # batch 1: every key padded
    ours, ref = run_both(q, k, v, do, mask, bs, backend, kpm=kpm)
    assert_close(ours, ref, 1e-5)
    out, dq, dk, dv = ours
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.equal(dq[1], torch.zeros_like(dq[1]))
    assert torch.equal(dk[1], torch.zeros_like(dk[1])) and torch.equal(dv[1], torch.zeros_like(dv[1]))
    assert torch.equal(out[0, 1, :bs], torch.zeros_like(out[0, 1, :bs]))
    assert torch.equal(dq[0, 1, :bs], torch.zeros_like(dq[0, 1, :bs]))
    # padded keys get no gradient
    assert torch.equal(dk[0][:, ~kpm[0]], torch.zeros_like(dk[0][:, ~kpm[0]]))


def test_triton_strided_inputs_and_tma_path():
    """[B, N, H, D] layouts (as diffusers produces) and the tensor-descriptor variant of every kernel."""
    b, h, n, d, bs = 1, 2, 140, 64, 64
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(b, n, h, d, generator=gen).transpose(1, 2) for _ in range(3))
    do = torch.randn(b, h, n, d, generator=gen)
    mask = make_mask("per_head", b, h, math.ceil(n / bs), gen)
    ours, ref = run_both(q, k, v, do, mask, bs, "triton", scale=0.2)
    assert_close(ours, ref, 1e-5)

    idx = block_index(mask)
    rows, cols = idx.schedule(b, h, transposed=False), idx.schedule(b, h, transposed=True, mode="natural")
    tma = KernelConfig(32, 64, 4, 2, tma=True)
    out, lse = block_sparse_forward(q, k, v, idx, rows, block_size=bs, scale=0.2, config=tma)
    grads = block_sparse_backward(do, q, k, v, out, lse, idx, rows, cols, block_size=bs, scale=0.2, dkdv_config=tma, dq_config=tma)
    assert_close((out, *grads), ref, 1e-5)


def _variant_case(dtype, seed, n=150, d=64, bs=64, b=2, h=2):
    """Tail block (N % bs != 0), per-head mask with an empty query-block row, key padding with a fully padded batch
    entry: everything a variant has to get right, at a size the interpreter runs in seconds."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(b, h, n, d, generator=gen).to(dtype) for _ in range(4))
    nb = math.ceil(n / bs)
    mask = torch.rand(h, nb, nb, generator=gen) < 0.6
    mask[:, :, 0] = True
    mask[:, :, nb - 1] = True  # the ragged tail key block is kept
    mask[1, 0, :] = False  # head 1, query block 0: no kept block
    kpm = torch.rand(b, n, generator=gen) < 0.7
    kpm[1] = False  # batch 1: every key padded
    return q, k, v, do, mask, kpm


def _fp64(q, k, v, do, mask, bs, scale, kpm):
    qr, kr, vr = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = dense_reference(qr, kr, vr, mask, bs, scale, kpm)
    ref.backward(do.double())
    return ref, qr.grad, kr.grad, vr.grad


@pytest.mark.parametrize(
    "dtype,fwd_cfg,scale",
    [
        (torch.float32, KernelConfig(32, 32, 4, 2, fold_scale=True, lazy_rescale=True, warp_specialize=True), 2.0),
        (torch.float16, KernelConfig(64, 32, 4, 2, lazy_rescale=True), 0.3),
        (torch.float32, KernelConfig(32, 64, 4, 2, fold_scale=True), -0.4),  # negative scale: fold falls back
    ],
)
def test_forward_variants_match_fp64(dtype, fwd_cfg, scale):
    """fold_scale / lazy_rescale / warp_specialize forward (with the default backward) against fp64.  scale=2 makes
    later key tiles raise row maxima by far more than the lazy threshold, so both rescale branches run."""
    q, k, v, do, mask, kpm = _variant_case(dtype, seed=21)
    b, h, bs = q.shape[0], q.shape[1], 64
    idx = block_index(mask)
    rows, cols = idx.schedule(b, h, transposed=False), idx.schedule(b, h, transposed=True)
    out, lse = block_sparse_forward(q, k, v, idx, rows, block_size=bs, scale=scale, key_padding_mask=kpm, config=fwd_cfg)
    grads = block_sparse_backward(do, q, k, v, out, lse, idx, rows, cols, block_size=bs, scale=scale, key_padding_mask=kpm)
    assert_close((out, *grads), _fp64(q, k, v, do, mask, bs, scale, kpm), 1e-5 if dtype == torch.float32 else 3e-3)
    assert torch.equal(out[1], torch.zeros_like(out[1]))  # no valid key: zeros
    assert torch.equal(out[0, 1, :bs], torch.zeros_like(out[0, 1, :bs]))  # empty query-block row


@pytest.mark.parametrize(
    "dtype,cfg",
    [
        (torch.float32, KernelConfig(32, 64, 4, 2, dq_reduce="atomic")),
        (torch.float16, KernelConfig(32, 32, 4, 2, dq_reduce="atomic_swap", warp_specialize=True)),
        (torch.float32, KernelConfig(64, 32, 4, 2, tma=True, dq_reduce="tma")),  # interpreter: atomic fallback
        (torch.float16, KernelConfig(32, 64, 4, 2, q_major=True)),
        (torch.float32, None),  # two-pass with a q-major dK/dV pass
    ],
)
def test_single_pass_backward_matches_fp64(dtype, cfg):
    """dK/dV program that also reduce-adds dQ (atomics), both score orientations, and the q-major two-pass dK/dV:
    tail block, key padding, empty rows, against fp64."""
    q, k, v, do, mask, kpm = _variant_case(dtype, seed=31)
    b, h, bs, scale = q.shape[0], q.shape[1], 64, 0.2
    idx = block_index(mask)
    rows, cols = idx.schedule(b, h, transposed=False), idx.schedule(b, h, transposed=True)
    out, lse = block_sparse_forward(q, k, v, idx, rows, block_size=bs, scale=scale, key_padding_mask=kpm)
    if cfg is None:
        dq, dk, dv = block_sparse_backward(do, q, k, v, out, lse, idx, rows, cols, block_size=bs, scale=scale,
                                           key_padding_mask=kpm, dkdv_config=KernelConfig(32, 64, 4, 2, q_major=True))
    else:
        dq, dk, dv = block_sparse_backward(do, q, k, v, out, lse, idx, rows, cols, block_size=bs, scale=scale,
                                           key_padding_mask=kpm, deterministic=False, single_pass_config=cfg)
    assert dq.dtype == dtype and dq.shape == q.shape
    assert_close((out, dq, dk, dv), _fp64(q, k, v, do, mask, bs, scale, kpm), 1e-5 if dtype == torch.float32 else 3e-3)
    for g in (dq, dk, dv):
        assert torch.equal(g[1], torch.zeros_like(g[1]))  # batch without a valid key
    assert torch.equal(dk[0][:, ~kpm[0]], torch.zeros_like(dk[0][:, ~kpm[0]]))  # padded keys: no gradient
    assert torch.equal(dq[0, 1, :bs], torch.zeros_like(dq[0, 1, :bs]))  # empty query-block row


def test_single_pass_selection(monkeypatch):
    """A 'single_pass' default config is used only for deterministic=False (then the dQ kernel never launches);
    asking for it explicitly with deterministic=True is an error."""
    q, k, v, do, mask, kpm = _variant_case(torch.float32, seed=41, n=128)
    idx = block_index(mask)
    rows, cols = idx.schedule(2, 2, transposed=False), idx.schedule(2, 2, transposed=True)
    out, lse = block_sparse_forward(q, k, v, idx, rows, block_size=64, scale=0.125)
    args = (do, q, k, v, out, lse, idx, rows, cols)
    with pytest.raises(ValueError, match="single_pass_config needs deterministic=False"):
        block_sparse_backward(*args, block_size=64, scale=0.125, single_pass_config=KernelConfig(32, 32, 4, 2))
    with pytest.raises(ValueError, match="dq_reduce='x' must be one of"):
        block_sparse_backward(*args, block_size=64, scale=0.125, deterministic=False,
                              single_pass_config=KernelConfig(32, 32, 4, 2, dq_reduce="x"))
    two_pass = block_sparse_backward(*args, block_size=64, scale=0.125, deterministic=False)  # no default: two kernels
    real = kernels_mod.default_configs
    monkeypatch.setattr(kernels_mod, "default_configs",
                        lambda *a: {**real(*a), "single_pass": KernelConfig(32, 32, 4, 2, dq_reduce="atomic_swap")})
    monkeypatch.setattr(kernels_mod, "_attn_bwd_dq", None)  # launching the dQ kernel now fails
    single = block_sparse_backward(*args, block_size=64, scale=0.125, deterministic=False)
    for a, b_ in zip(single, two_pass):
        assert rel(a, b_) < 1e-5
    with pytest.raises(TypeError):  # deterministic: the two-kernel path, i.e. the (removed) dQ kernel
        block_sparse_backward(*args, block_size=64, scale=0.125, deterministic=True)


def test_grad_only_for_some_inputs():
    gen = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(1, 1, 100, 64, generator=gen) for _ in range(3))
    mask = torch.ones(2, 2, dtype=torch.bool)
    k.requires_grad_()
    block_sparse_attention(q, k, v, mask, block_size=64, backend="triton").sum().backward()
    kr = k.detach().double().requires_grad_()
    dense_reference(q, kr, v, mask, 64).sum().backward()
    assert rel(k.grad, kr.grad) < 1e-5 and q.grad is None


# ----------------------------------------------------------------------------------------- indices


def test_block_index_lists_and_schedule():
    gen = torch.Generator().manual_seed(1)
    mask = torch.rand(2, 7, 7, generator=gen) < 0.4
    mask[0, 3] = False
    idx = block_index(mask)
    for g in range(2):
        for i in range(7):
            row = g * 7 + i
            kv = idx.kv_idx[idx.kv_ptr[row] : idx.kv_ptr[row + 1]].tolist()
            assert kv == torch.nonzero(mask[g, i]).flatten().tolist()
            qs = idx.q_idx[idx.q_ptr[row] : idx.q_ptr[row + 1]].tolist()
            assert qs == torch.nonzero(mask[g, :, i]).flatten().tolist()
    sched = idx.schedule(3, 2, transposed=True)  # B=3 shares the [Hm=2] mask
    assert sorted(sched.tolist()) == list(range(3 * 2 * 7))
    bh, blk = sched // 7, sched % 7
    assert torch.equal(bh, torch.sort(bh).values)  # heads of one batch stay together, in order
    work = idx.q_count[bh % 2, blk]
    for head in range(6):  # longest columns first within each head
        w = work[bh == head]
        assert torch.equal(w, torch.sort(w, descending=True).values)


def test_index_cache_hits_and_rebuilds_on_mutation():
    mask = torch.rand(5, 5) < 0.5
    before = indices_mod.build_count
    first = block_index(mask)
    assert block_index(mask) is first and indices_mod.build_count == before + 1
    mask[0, 0] = ~mask[0, 0]  # in-place change bumps the version counter
    second = block_index(mask)
    assert second is not first and indices_mod.build_count == before + 2
    assert int(second.kv_count[0, 0]) == int(mask[0].sum())
    assert block_index(mask.clone()) is not second  # another tensor: its own entry


def test_repeated_calls_do_not_rebuild_index():
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 128, 64, generator=gen) for _ in range(3))
    mask = torch.rand(2, 2, generator=gen) < 0.7
    mask[:, 0] = True
    block_sparse_attention(q, k, v, mask, block_size=64, backend="triton")
    before = indices_mod.build_count
    out = block_sparse_attention(q, k, v, mask, block_size=64, backend="triton")
    assert indices_mod.build_count == before
    assert rel(out, dense_reference(q, k, v, mask, 64)) < 1e-5


# ----------------------------------------------------------------------------------------- bad input

_Q = torch.randn(2, 3, 100, 64)
_M = torch.ones(2, 2, dtype=torch.bool)


@pytest.mark.parametrize(
    "kwargs,exc,needle",
    [
        (dict(q=_Q[0]), ValueError, "q must have shape [B, H, N, D]"),
        (dict(k=_Q[:, :, :50]), ValueError, "same shape"),
        (dict(v=_Q.double()), TypeError, "one dtype"),
        (dict(q=_Q.long(), k=_Q.long(), v=_Q.long()), TypeError, "q, k, v must be float"),
        (dict(q="x"), TypeError, "q must be a torch.Tensor"),
        (dict(block_mask=_M.float()), TypeError, "block_mask must have dtype torch.bool"),
        (dict(block_mask=torch.ones(3, 3, dtype=torch.bool)), ValueError, "block_mask must have shape [2, 2]"),
        (dict(block_mask=torch.ones(2, 2, 2, dtype=torch.bool)), ValueError, "Hm in {1, 3}"),
        (dict(block_mask=torch.ones(1, 3, 2, 2, dtype=torch.bool)), ValueError, "block_mask must have shape"),
        (dict(block_mask=[[True]]), TypeError, "block_mask must be a bool torch.Tensor"),
        (dict(block_size=8), ValueError, "block_size must be >= 16"),
        (dict(block_size=64.0), TypeError, "block_size must be an int"),
        (dict(scale="a"), TypeError, "scale must be a float"),
        (dict(scale=float("nan")), ValueError, "scale must be finite"),
        (dict(backend="cuda"), ValueError, "backend must be one of"),
        (dict(key_padding_mask=torch.ones(2, 99, dtype=torch.bool)), ValueError, "key_padding_mask must have shape [B, N] = [2, 100]"),
        (dict(key_padding_mask=torch.ones(2, 100)), TypeError, "key_padding_mask must have dtype torch.bool"),
        (dict(q=torch.randn(2, 3, 100, 48), k=torch.randn(2, 3, 100, 48), v=torch.randn(2, 3, 100, 48), backend="triton"), ValueError, "head dim D in (64, 128)"),
        (dict(block_size=32, block_mask=torch.ones(4, 4, dtype=torch.bool), backend="triton"), ValueError, "block_size in (64, 128)"),
        (dict(q=_Q.double(), k=_Q.double(), v=_Q.double(), backend="triton"), TypeError, "backend='triton' supports q/k/v dtypes"),
    ],
)
def test_bad_input(kwargs, exc, needle):
    args = dict(q=_Q, k=_Q, v=_Q, block_mask=_M, block_size=64)
    args.update(kwargs)
    q, k, v, m = args.pop("q"), args.pop("k"), args.pop("v"), args.pop("block_mask")
    with pytest.raises(exc) as info:
        block_sparse_attention(q, k, v, m, **args)
    assert needle in str(info.value)


# ----------------------------------------------------------------------------------------- GPU tier


@pytest.mark.gpu
def test_gpu_bf16_realistic_against_sdpa():
    """bf16, 15,600 tokens (10 Wan frames), radial-like banded mask with a sink and a dense tail block."""
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    b, h, n, d, bs = 1, 4, 15600, 128, 128
    nb = math.ceil(n / bs)
    i = torch.arange(nb, device=dev)
    mask = ((i[:, None] - i[None, :]).abs() <= 6) | (i[None, :] < 12) | (i[None, :] == nb - 1)
    mask[5] = False
    q, k, v = (torch.randn(b, h, n, d, generator=gen, device=dev, dtype=torch.bfloat16).requires_grad_() for _ in range(3))
    do = torch.randn(b, h, n, d, generator=gen, device=dev, dtype=torch.bfloat16)
    out = block_sparse_attention(q, k, v, mask)
    out.backward(do)
    assert all(torch.isfinite(t).all() for t in (out, q.grad, k.grad, v.grad))

    # rows [r0, n): dense SDPA in fp32 with the block mask expanded to an additive bias
    r0 = n - 1000
    rows = torch.arange(r0, n, device=dev) // bs
    allowed = mask[rows].repeat_interleave(bs, dim=-1)[:, :n]
    bias = torch.zeros(allowed.shape, device=dev).masked_fill(~allowed, float("-inf"))
    qs, ks, vs = (x.detach().float().requires_grad_() for x in (q, k, v))
    ref = F.scaled_dot_product_attention(qs[:, :, r0:], ks, vs, attn_mask=bias)
    assert rel(out[:, :, r0:], ref) < 2e-2
    ref.backward(do[:, :, r0:].float())
    # only rows r0.. contribute to ref: compare dq on those rows; dk/dv against the torch backend (fp32)
    assert rel(q.grad[:, :, r0:], qs.grad[:, :, r0:]) < 2e-2
    q2, k2, v2 = (x.detach().float().requires_grad_() for x in (q, k, v))
    block_sparse_attention(q2, k2, v2, mask, backend="torch").backward(do.float())
    for ours, theirs in ((q.grad, q2.grad), (k.grad, k2.grad), (v.grad, v2.grad)):
        assert rel(ours, theirs) < 2e-2
    assert torch.equal(out[:, :, 5 * bs : 6 * bs], torch.zeros_like(out[:, :, 5 * bs : 6 * bs]))
