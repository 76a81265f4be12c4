"""AttentionRouter: dense / radial / svg2 routing against fp64 references, checks, step bookkeeping."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from train.attention import AttentionRouter
from train.config_schema import AttentionConfig
from train.geometry import VideoGeometry

# 4 latent frames x 16 tokens per frame = 64 video tokens.
GEOM = VideoGeometry(
    frames=13, height=32, width=64, latent_frames=4, latent_height=4, latent_width=8, tokens_per_frame=16
)


def _qkv(n: int, *, b: int = 2, h: int = 2, d: int = 16, seed: int = 0, grad: bool = False):
    g = torch.Generator().manual_seed(seed)
    out = [torch.randn(b, h, n, d, generator=g) for _ in range(3)]
    return [t.requires_grad_(grad) for t in out]


def _reference(q, k, v, token_mask=None):
    """fp64 softmax attention; ``token_mask`` bool [B or 1, 1 or H, N, N], True = attend."""
    q, k, v = (t.double() for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if token_mask is not None:
        scores = scores.masked_fill(~token_mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def _expand(block_mask: torch.Tensor, n: int, bs: int) -> torch.Tensor:
    return block_mask.repeat_interleave(bs, 0).repeat_interleave(bs, 1)[:n, :n]


def test_dense_equals_reference_with_key_padding() -> None:
    text = 8
    router = AttentionRouter(AttentionConfig(type="dense"), GEOM, radial_rule="hunyuan")
    q, k, v = _qkv(GEOM.video_tokens + text)
    pad = torch.ones(2, GEOM.video_tokens + text, dtype=torch.bool)
    pad[1, -3:] = False  # sample 1 has 5 valid text tokens
    out = router(0, q, k, v, text_tokens=text, key_padding_mask=pad)
    ref = _reference(q, k, v, pad[:, None, None, :])
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    assert out.dtype == q.dtype and router.density() == 1.0
    # exactly what SDPA gives
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, attn_mask=pad[:, None, None, :]))


def test_radial_all_true_mask_equals_dense_with_grads() -> None:
    # One block larger than the sequence: the official rule makes the block that holds the video tail dense,
    # so the single block is True. (block_size == N would not do: the 1/3-0.6 quantisation drops it.)
    n = GEOM.video_tokens
    router = AttentionRouter(AttentionConfig(type="radial", block_size=n + 16, backend="torch"), GEOM, radial_rule="wan")
    assert bool(router.radial_mask().all()) and router.radial_mask().shape == (1, 1)
    q, k, v = _qkv(n, grad=True)
    out = router(0, q, k, v)
    ref = _reference(q, k, v)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    go = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), go)
    ref_grads = torch.autograd.grad(ref, (q, k, v), go.double())
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert router.density() == 1.0


def test_radial_uses_the_radial_mask_and_reports_its_density() -> None:
    from sparse_attn import mask_density, radial_block_mask

    bs = 16
    cfg = AttentionConfig(type="radial", block_size=bs, dense_layers=1, backend="torch")
    router = AttentionRouter(cfg, GEOM, radial_rule="wan")
    want = radial_block_mask(GEOM.latent_frames, GEOM.tokens_per_frame, block_size=bs, model="wan")
    assert torch.equal(router.radial_mask(), want)
    assert not bool(want.all())  # a real sparse mask, so the comparison below can fail
    q, k, v = _qkv(GEOM.video_tokens)
    router.begin_step()
    dense_out = router(0, q, k, v)  # layer 0 < dense_layers
    sparse_out = router(1, q, k, v)
    torch.testing.assert_close(dense_out.double(), _reference(q, k, v), atol=1e-5, rtol=1e-5)
    ref = _reference(q, k, v, _expand(want, GEOM.video_tokens, bs)[None, None])
    torch.testing.assert_close(sparse_out.double(), ref, atol=1e-5, rtol=1e-5)
    assert router.density() == pytest.approx(mask_density(want, block_size=bs))
    # per-call dense flag and the override context force dense
    torch.testing.assert_close(router(1, q, k, v, dense=True), dense_out)
    with router.dense_override():
        assert router.force_dense
        torch.testing.assert_close(router(1, q, k, v), dense_out)
    assert not router.force_dense


def test_radial_text_tokens_and_key_padding() -> None:
    bs, text = 16, 8
    router = AttentionRouter(AttentionConfig(type="radial", block_size=bs, backend="torch"), GEOM, radial_rule="hunyuan")
    n = GEOM.video_tokens + text
    q, k, v = _qkv(n)
    pad = torch.ones(2, n, dtype=torch.bool)
    pad[0, -5:] = False
    out = router(0, q, k, v, text_tokens=text, key_padding_mask=pad)
    mask = router.radial_mask(text_tokens=text)
    assert mask.shape == (math.ceil(n / bs),) * 2 and bool(mask[-1].all()) and bool(mask[:, -1].all())
    token_mask = _expand(mask, n, bs)[None, None] & pad[:, None, None, :]
    torch.testing.assert_close(out.double(), _reference(q, k, v, token_mask), atol=1e-5, rtol=1e-5)


def test_token_count_mismatch_raises() -> None:
    router = AttentionRouter(AttentionConfig(type="radial", block_size=16), GEOM, radial_rule="wan")
    q, k, v = _qkv(GEOM.video_tokens + 3)
    with pytest.raises(ValueError, match=r"mask does not match the token count.*N=67.*64"):
        router(0, q, k, v)
    with pytest.raises(ValueError, match=r"N=67.*gives 72"):
        router(0, q, k, v, text_tokens=8)
    # a new geometry is honoured
    router.set_geometry(VideoGeometry(17, 32, 64, 5, 4, 8, 16))
    q, k, v = _qkv(80)
    assert router(0, q, k, v).shape == q.shape


@pytest.mark.parametrize(
    ("field", "value", "pattern"),
    [
        ("type", "flash", "attention.type"),
        ("block_size", 8, "attention.block_size"),
        ("dense_layers", -1, "attention.dense_layers"),
        ("decay_factor", 0.0, "attention.decay_factor"),
        ("top_p", 0.0, "attention.top_p"),
        ("num_k_clusters", 0, "attention.num_k_clusters"),
        ("min_kc_ratio", 1.5, "attention.min_kc_ratio"),
    ],
)
def test_bad_config_names_the_key(field: str, value: object, pattern: str) -> None:
    cfg = AttentionConfig()
    setattr(cfg, field, value)
    with pytest.raises(ValueError, match=pattern):
        AttentionRouter(cfg, GEOM, radial_rule="wan")


def test_bad_model_and_inputs() -> None:
    with pytest.raises(ValueError, match="radial_rule must be one of"):
        AttentionRouter(AttentionConfig(), GEOM, radial_rule="sora")
    router = AttentionRouter(AttentionConfig(type="dense"), GEOM, radial_rule="wan")
    q, k, v = _qkv(GEOM.video_tokens)
    with pytest.raises(ValueError, match="key_padding_mask"):
        router(0, q, k, v, key_padding_mask=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="4-D"):
        router(0, q[0], k, v)


def test_svg2_routing_is_replayed_within_a_step() -> None:
    # One Lloyd iteration per call: k-means is far from converged, so clustering again (from the state the
    # first call returned) would give another routing; a recomputation in the same step must not.
    cfg = AttentionConfig(type="svg2", num_q_clusters=6, num_k_clusters=6, top_p=0.5, min_kc_ratio=0.0,
                          kmeans_iters=1, backend="torch")
    router = AttentionRouter(cfg, GEOM, radial_rule="wan")
    q, k, v = _qkv(GEOM.video_tokens, b=1)
    router.begin_step()
    first = router(0, q, k, v)
    state = router.svg2_state(0)
    assert 0.0 < router.density() < 1.0 and router.density() == pytest.approx(state.density)
    again = router(0, q, k, v)  # what gradient checkpointing does during backward
    assert torch.equal(first, again)
    assert router.svg2_state(0) is state
    router.begin_step()  # next step: warm start from `state` -> different routing on the same inputs
    later = router(0, q, k, v)
    assert router.svg2_state(0) is not state
    assert not torch.equal(first, later)


def test_svg2_top_p_one_equals_dense() -> None:
    cfg = AttentionConfig(type="svg2", num_q_clusters=4, num_k_clusters=4, top_p=1.0, min_kc_ratio=1.0,
                          kmeans_iters=2, backend="torch")
    router = AttentionRouter(cfg, GEOM, radial_rule="wan")
    q, k, v = _qkv(GEOM.video_tokens)
    torch.testing.assert_close(router(0, q, k, v).double(), _reference(q, k, v), atol=1e-5, rtol=1e-5)


def test_density_follows_the_last_step() -> None:
    router = AttentionRouter(AttentionConfig(type="radial", block_size=16, backend="torch"), GEOM, radial_rule="wan")
    q, k, v = _qkv(GEOM.video_tokens, b=1)
    router.begin_step()
    router(0, q, k, v)
    sparse = router.density()
    assert sparse < 1.0
    router.begin_step()
    router.begin_step()  # repeated begin_step without calls keeps the last figures
    assert router.density() == sparse
    with router.dense_override():
        router(0, q, k, v)
    assert router.density() == 1.0  # only dense calls in this step
    assert router.step == 3
