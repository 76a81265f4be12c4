"""AttentionRouter and its methods: dense / radial / svg2 against fp64 references, the registry, the one config
check, step bookkeeping and the checkpointed state."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from train.attention import METHODS, AttentionRouter
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
    assert bool(router.method.mask(GEOM).all()) and router.method.mask(GEOM).shape == (1, 1)
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
    assert torch.equal(router.method.mask(GEOM), want)
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
    mask = router.method.mask(GEOM, text_tokens=text)
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
    ("field", "value", "expected"),
    [
        ("type", "flash", f"expected one of {', '.join(METHODS)}; got 'flash'"),  # the registry's names
        ("backend", "cuda", "expected one of auto, fa4, triton, torch; got 'cuda'"),
        ("block_size", 8, "expected an integer >= 16, got 8"),  # the kernels' bound, everywhere
        ("dense_layers", -1, "expected an integer >= 0, got -1"),
        ("decay_factor", 0.0, "expected a positive finite number, got 0.0"),
        ("decay_factor", math.inf, "expected a positive finite number, got inf"),
        ("attention_sink", "yes", "expected true, false or null, got 'yes'"),
        ("top_p", 0.0, "expected a value in (0, 1], got 0.0"),
        ("num_k_clusters", 0, "expected a positive integer, got 0"),
        ("min_kc_ratio", 1.5, "expected a value in [0, 1], got 1.5"),
        ("kmeans_iters", 0, "expected null or an integer >= 1, got 0"),  # svg2_attention runs at least one
    ],
)
def test_bad_config_names_the_key_the_same_way_everywhere(field: str, value: object, expected: str) -> None:
    """One check: the router, a recipe and the sampler's options give one message, naming the key as each user
    wrote it (every method's keys are checked whatever attention.type is)."""
    from train.config import ConfigError, load_config
    from train.sampling import SampleOptions, check_options

    cfg = AttentionConfig(type="dense")
    setattr(cfg, field, value)
    with pytest.raises(ValueError) as router_err:
        AttentionRouter(cfg, GEOM, radial_rule="wan")
    assert str(router_err.value).startswith(f"attention.{field}: {expected}")
    override = f"attention.{field}={'.inf' if value == math.inf else value}"
    with pytest.raises(ConfigError) as recipe_err:
        load_config(None, ["model.pretrained=m", "data.path=d", "attention.type=dense", override])
    if field in ("backend", "attention_sink"):  # the schema's type (Literal, bool) already refuses it on loading
        assert str(recipe_err.value).startswith(f"attention.{field}: expected ")
    else:
        assert str(recipe_err.value) == str(router_err.value)
    flag = "--attention" if field == "type" else "--" + field.replace("_", "-")
    with pytest.raises(ValueError) as cli_err:
        check_options(SampleOptions(model="org/m", prompt="x", attention=cfg))
    assert str(cli_err.value) == str(router_err.value).replace(f"attention.{field}", flag, 1)


#: Settings under which a method is exact (equals fp64 dense attention): radial with one block larger than the clip
#: (an all-true mask), svg2 keeping every key cluster. A method not listed here is checked for shape and finiteness.
EXACT = {"dense": {}, "radial": dict(block_size=GEOM.video_tokens + 16),
         "svg2": dict(top_p=1.0, min_kc_ratio=1.0, num_q_clusters=4, num_k_clusters=4)}


def test_methods_come_from_the_registry() -> None:
    """attention.type's choices are the registry's; every registered method builds and attends a tiny call on CPU
    (backend torch), like fp64 dense attention where it is exact."""
    from train.attention import get_method
    from train.attention.methods.base import AttentionMethod
    from train.config import ConfigError, load_config
    from train.sample import parse_args

    assert {"dense", "radial", "svg2"} <= set(METHODS)
    q, k, v = _qkv(GEOM.video_tokens)
    for name in METHODS:
        cls = get_method(name)
        assert issubclass(cls, AttentionMethod) and cls.__module__ == f"train.attention.methods.{name}"
        cfg = AttentionConfig(type=name, backend="torch", **{"block_size": 16, **EXACT.get(name, {})})
        router = AttentionRouter(cfg, GEOM, radial_rule="wan")
        assert isinstance(router.method, cls)
        router.begin_step()
        out = router(1, q, k, v)
        assert out.shape == q.shape and out.dtype == q.dtype and bool(out.isfinite().all())
        assert 0.0 < router.density() <= 1.0
        if name in EXACT:
            torch.testing.assert_close(out.double(), _reference(q, k, v), atol=1e-5, rtol=1e-5)
            assert router.density() == 1.0
        assert load_config(None, ["model.pretrained=m", "data.path=d", f"attention.type={name}"]).attention.type == name
        assert parse_args(["--model", "m", "--prompt", "p", "--attention", name]).attention.type == name
    choices = ", ".join(METHODS)
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.pretrained=m", "data.path=d", "attention.type=radail"])
    assert str(err.value) == f"attention.type: expected one of {choices}; got 'radail' (str); did you mean 'radial'?"
    with pytest.raises(ValueError, match=f"attention.type: expected one of {choices}; got 'flash'"):
        get_method("flash")


def test_router_state_dict_keeps_its_format() -> None:
    """The router's checkpointed state is {"step", "svg2"} for every method (checkpoints of earlier runs resume);
    svg2's warm-start centroids survive a round trip into a fresh router."""
    q, k, v = _qkv(GEOM.video_tokens, b=1)
    radial = AttentionRouter(AttentionConfig(type="radial", block_size=16, backend="torch"), GEOM, radial_rule="wan")
    radial.begin_step()
    radial(1, q, k, v)
    assert radial.state_dict() == {"step": 1, "svg2": {}}
    cfg = AttentionConfig(type="svg2", num_q_clusters=4, num_k_clusters=4, kmeans_iters=1, backend="torch")
    router = AttentionRouter(cfg, GEOM, radial_rule="wan")
    for _ in range(2):
        router.begin_step()
        router(3, q, k, v)
    state = router.state_dict()
    assert state["step"] == 2 and list(state["svg2"]) == ["3"]
    saved = state["svg2"]["3"]
    assert set(saved) == {"q_centroids", "k_centroids", "calls", "shape", "device_type"}
    assert saved["shape"] == list(q.shape) and saved["device_type"] == "cpu"
    resumed = AttentionRouter(cfg, GEOM, radial_rule="wan")
    resumed.load_state_dict(state)
    assert resumed.step == 2
    router.begin_step()
    resumed.begin_step()
    assert torch.equal(router(3, q, k, v), resumed(3, q, k, v))  # both warm-start from the same centroids


def test_bad_model_and_inputs() -> None:
    with pytest.raises(ValueError, match="radial_rule must be one of"):  # sparse_attn.radial's rule names
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
    state = router.method.state(0)
    assert 0.0 < router.density() < 1.0 and router.density() == pytest.approx(state.density)
    again = router(0, q, k, v)  # what gradient checkpointing does during backward
    assert torch.equal(first, again)
    assert router.method.state(0) is state
    router.begin_step()  # next step: warm start from `state` -> different routing on the same inputs
    later = router(0, q, k, v)
    assert router.method.state(0) is not state
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
