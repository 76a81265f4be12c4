"""backend="fa4": support checks and auto-resolution (CPU), block-list construction (CPU), fp64 checks (GPU tier)."""

from __future__ import annotations

import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from sparse_attn import block_sparse as bs_mod
from sparse_attn.backends import fa4
from sparse_attn.block_sparse import block_sparse_attention

from test_block_sparse import assert_close, make_mask, run_both


# ----------------------------------------------------------------------------------------- CPU: dispatch


@pytest.fixture
def fake_fa4(monkeypatch):
    """Pretend flash-attn-4 is importable and the GPU is an sm90 (the dispatch logic only, no kernel runs)."""
    monkeypatch.setattr(fa4, "_import_error", lambda: None)
    monkeypatch.setattr(fa4, "_capability", lambda index: (9, 0))
    return monkeypatch


def _cuda_q(d=128, dtype=torch.bfloat16):
    with FakeTensorMode():
        return torch.empty(1, 2, 300, d, device="cuda", dtype=dtype)


def test_auto_resolution_without_fa4(monkeypatch):
    monkeypatch.setattr(fa4, "_import_error", lambda: "flash-attn-4 is not importable (ImportError: x)")
    monkeypatch.setattr(fa4, "_capability", lambda index: (9, 0))
    assert bs_mod._resolve_backend("auto", _cuda_q(), 128, False) == "triton"
    assert bs_mod._resolve_backend("auto", _cuda_q(d=96), 128, False) == "torch"  # Triton lacks D=96
    assert bs_mod._resolve_backend("auto", torch.empty(1, 2, 300, 128), 128, False) == "torch"


def test_fa4_refuses_deterministic(fake_fa4):
    with pytest.raises(ValueError, match="backend='fa4' has no deterministic block-sparse backward"):
        bs_mod._resolve_backend("fa4", _cuda_q(), 128, True)


def test_fa4_backward_refuses_deterministic():
    """The one guard left for callers that reach the op directly (SVG2's block form with backend='fa4')."""
    with pytest.raises(ValueError, match="^backend 'fa4' has no deterministic block-sparse backward"):
        fa4.backward(*([None] * 12), True, None)


def test_auto_resolution_with_fa4(fake_fa4):
    assert bs_mod._resolve_backend("auto", _cuda_q(), 128, False) == "fa4"
    assert bs_mod._resolve_backend("auto", _cuda_q(d=64, dtype=torch.float16), 128, False) == "fa4"
    assert bs_mod._resolve_backend("auto", _cuda_q(), 128, True) == "triton"  # deterministic: no dQ atomics
    assert bs_mod._resolve_backend("auto", _cuda_q(), 64, False) == "triton"  # FA4 needs 128-blocks
    assert bs_mod._resolve_backend("auto", _cuda_q(dtype=torch.float32), 128, False) == "triton"
    fake_fa4.setattr(fa4, "_capability", lambda index: (8, 0))  # Ampere
    assert bs_mod._resolve_backend("auto", _cuda_q(), 128, False) == "triton"


@pytest.mark.parametrize(
    "q,block_size,cap,exc,needle",
    [
        ("cuda", 128, (8, 6), ValueError, "backend='fa4': needs an sm90 (Hopper) or sm100 (Blackwell) GPU, this one is sm86"),
        ("fp32", 128, (9, 0), TypeError, "backend='fa4': supports q/k/v dtypes float16, bfloat16; got torch.float32"),
        ("d96", 128, (9, 0), ValueError, "backend='fa4': supports head dim D in (64, 128), got D=96"),
        ("cuda", 64, (9, 0), ValueError, "backend='fa4': supports block_size=128 only, got 64"),
        ("cpu", 128, (9, 0), ValueError, "backend='fa4': needs CUDA tensors, got device cpu"),
    ],
)
def test_fa4_unsupported_errors(fake_fa4, q, block_size, cap, exc, needle):
    fake_fa4.setattr(fa4, "_capability", lambda index: cap)
    x = {"cuda": _cuda_q(), "fp32": _cuda_q(dtype=torch.float32), "d96": _cuda_q(d=96),
         "cpu": torch.empty(1, 2, 300, 128)}[q]
    with pytest.raises(exc) as info:
        bs_mod._resolve_backend("fa4", x, block_size, False)
    assert str(info.value) == needle


def test_fa4_not_installed_error():
    if fa4.installed():
        pytest.skip("flash-attn-4 is installed here")
    q = torch.randn(1, 2, 256, 64)
    with pytest.raises(ImportError, match=r"^backend='fa4': flash-attn-4 is not importable .*pip install '\.\[fa4\]'$"):
        block_sparse_attention(q, q, q, torch.ones(2, 2, dtype=torch.bool), backend="fa4")


# ----------------------------------------------------------------------------------------- CPU: block lists


def test_lists_ascending_with_counts():
    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(2, 3, 9, 9, generator=gen) < 0.4
    cnt, idx = fa4._lists(mask)
    assert cnt.dtype == idx.dtype == torch.int32 and idx.shape == (2, 3, 9, 9)
    for b in range(2):
        for h in range(3):
            for r in range(9):
                want = torch.nonzero(mask[b, h, r]).flatten().tolist()
                assert int(cnt[b, h, r]) == len(want) and idx[b, h, r, : len(want)].tolist() == want


def test_split_full_partial_with_padding_and_partial_mask():
    """Full blocks hold only valid keys, partial blocks every block with an invalid key, dropped blocks none."""
    gen = torch.Generator().manual_seed(1)
    n, bs, nb = 300, 128, 3  # ragged tail block of 44 tokens
    mask = torch.rand(2, nb, nb, generator=gen) < 0.8  # [Hm, Nb, Nb]
    kpm = torch.ones(2, n, dtype=torch.bool)
    kpm[0, 130:140] = False  # block 1 of batch 0 partly padded
    kpm[1, 128:256] = False  # block 1 of batch 1 fully padded: dropped
    pm = torch.zeros(2, nb, nb, dtype=torch.bool)
    pm[:, 0, 0] = True
    full, partial, key_valid = fa4.split_full_partial(mask, kpm, pm, n, bs)
    assert full.shape == partial.shape == (2, 2, nb, nb)
    assert not (full & partial).any()
    assert key_valid.shape == (2, nb * bs) and not key_valid[:, n:].any()
    kept = mask[None].expand(2, 2, nb, nb)
    assert torch.equal(partial[1, :, :, 1] | full[1, :, :, 1], torch.zeros_like(full[1, :, :, 1]))  # dropped
    assert torch.equal(partial[0, :, :, 1], kept[0, :, :, 1])  # partly padded: partial
    assert torch.equal(partial[:, :, :, 2], kept[:, :, :, 2])  # ragged tail with padding rows: partial
    assert torch.equal(partial[:, :, 0, 0], kept[:, :, 0, 0])  # caller-marked
    assert torch.equal(full | partial, kept & torch.tensor([True, True, True])[None, None, None, :]
                       & ~torch.tensor([[False, False, False], [False, True, False]])[:, None, None, :])
    # without padding or partial mask: every kept block is full, nothing partial
    full2, partial2, kv2 = fa4.split_full_partial(mask, None, None, n, bs)
    assert torch.equal(full2[0], mask) and not partial2.any() and kv2 is None


# ----------------------------------------------------------------------------------------- GPU tier

_needs_fa4 = pytest.mark.skipif(not (torch.cuda.is_available() and fa4.installed()), reason="needs CUDA and flash-attn-4")


def _gpu_run(kind, b=2, h=3, n=1000, d=128, dtype=torch.bfloat16, kpm=None, scale=None, layout="bhnd", seed=0):
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(seed)
    nb = math.ceil(n / 128)
    mask = make_mask(kind, b, h, nb, gen).to(dev)
    q, k, v, do = (torch.randn(b, h, n, d, generator=gen).to(dev, dtype) for _ in range(4))
    if kpm is not None:
        kpm = kpm.to(dev)
    if layout == "bnhd":
        t = [x.transpose(1, 2).contiguous() for x in (q, k, v, do)]
        qg, kg, vg = (x.clone().requires_grad_() for x in t[:3])
        out = block_sparse_attention(qg, kg, vg, mask, backend="fa4", layout="bnhd", key_padding_mask=kpm, scale=scale)
        assert out.shape == (b, n, h, d) and out.is_contiguous()
        out.backward(t[3])
        ours = tuple(x.transpose(1, 2) for x in (out, qg.grad, kg.grad, vg.grad))
        _, ref = run_both(q, k, v, do, mask, 128, "torch", kpm=kpm, scale=scale)
        return ours, ref
    return run_both(q, k, v, do, mask, 128, "fa4", kpm=kpm, scale=scale)


@pytest.mark.gpu
@_needs_fa4
@pytest.mark.parametrize("kind", ["shared", "per_head", "batch", "batch_head", "dense", "nearly_empty"])
def test_gpu_fa4_mask_forms_vs_fp64(kind):
    """Every mask form, N=1000 (ragged 104-token tail block), empty query-block rows (zeros, zero grads)."""
    ours, ref = _gpu_run(kind)
    assert_close(ours, ref, 2e-2)
    if kind != "dense" and kind != "nearly_empty":
        rows = slice(128, 256)  # make_mask empties query block 1
        assert torch.equal(ours[0][:, :, rows], torch.zeros_like(ours[0][:, :, rows]))
        assert torch.equal(ours[1][:, :, rows], torch.zeros_like(ours[1][:, :, rows]))


@pytest.mark.gpu
@_needs_fa4
def test_gpu_fa4_key_padding_scale_fp16_d64():
    gen = torch.Generator().manual_seed(3)
    kpm = torch.rand(2, 1000, generator=gen) < 0.7
    kpm[1, 256:] = False  # whole key blocks without a valid key: dropped from the lists
    ours, ref = _gpu_run("per_head", d=64, dtype=torch.float16, kpm=kpm, scale=0.3)
    assert_close(ours, ref, 5e-3)
    kpm = torch.ones(2, 1000, dtype=torch.bool)
    kpm[0] = False  # a batch entry without any valid key: zeros and zero gradients
    ours, ref = _gpu_run("shared", kpm=kpm, seed=4)
    assert_close((o[1:] for o in ours), (r[1:] for r in ref), 2e-2)
    assert all(torch.equal(o[0], torch.zeros_like(o[0])) for o in ours[:2])


@pytest.mark.gpu
@_needs_fa4
def test_gpu_fa4_layout_bnhd():
    ours, ref = _gpu_run("per_head", layout="bnhd", scale=0.1)
    assert_close(ours, ref, 2e-2)


@pytest.mark.gpu
@_needs_fa4
def test_gpu_fa4_deterministic_and_auto():
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(5)
    q, k, v = (torch.randn(1, 4, 2000, 128, generator=gen, device=dev, dtype=torch.bfloat16) for _ in range(3))
    mask = torch.rand(16, 16, generator=gen, device=dev) < 0.5
    mask.fill_diagonal_(True)
    with pytest.raises(ValueError, match="no deterministic block-sparse backward"):
        block_sparse_attention(q, k, v, mask, backend="fa4", deterministic=True)
    assert bs_mod._resolve_backend("auto", q, 128, False) == "fa4"
    assert bs_mod._resolve_backend("auto", q, 128, True) == "triton"
