"""Radial Attention block mask: fast analytic build vs a literal token-canvas oracle.

The oracle below follows the official algorithm (``gen_log_mask_shrinked`` of
mit-han-lab/radial-attention, HEAD rule) step by step: one token-level mask per frame pair,
pasted on a block-aligned canvas, cropped, shrunk with ``shrinkMaskStrict`` and OR-ed into the
grid. It shares no code with ``sparse_attn.radial``. It is slow (O(F^2 * (K*bs)^2)), so it runs
on small configurations; the published figures are checked on the fast version.
"""

from __future__ import annotations

import functools
import math
import random
import time

import pytest
import torch

from sparse_attn.radial import MODELS, mask_density, radial_block_mask

# ------------------------------------------------------------------------------------------
# literal oracle
# ------------------------------------------------------------------------------------------


def _oracle_window(d: int, tpf: int, bs: int, decay: float, model: str) -> float | int:
    """``get_window_width`` of the official HEAD code (Mochi has no branch: Hunyuan rule)."""
    if model == "wan":
        if d < 1:
            return tpf
        if d == 1:
            return tpf  # HEAD (2025-11-11); it was tpf // 2 before
    elif model in ("hunyuan", "mochi"):
        if d <= 1:
            return tpf
    else:
        raise AssertionError(model)
    decay_length = 2 ** tpf.bit_length() / 2 ** d.bit_length() * decay
    return decay_length if decay_length >= bs else bs


def _oracle_pair_kept(d: int, tpf: int) -> bool:
    """``get_diagonal_split_mask``: threshold 128 tokens, whatever the block size."""
    decay_length = 2 ** tpf.bit_length() / 2 ** d.bit_length()
    if decay_length >= 128:
        return True
    return d % int(128 / decay_length) == 0


def _oracle_shrink(canvas: torch.Tensor, bs: int) -> torch.Tensor:
    """``shrinkMaskStrict`` with the integer forms of its float thresholds."""
    n = canvas.shape[0] // bs
    grid = canvas[: n * bs, : n * bs].reshape(n, bs, n, bs)
    count = grid.sum(dim=1, dtype=torch.int64)  # [row block, col block, column]
    nonzero = (count > 0).sum(dim=-1)
    dense = (3 * count > bs).sum(dim=-1)
    return 5 * dense > 3 * nonzero


def _oracle_pair_blocks(
    w: float | int, sink: bool, kept: bool, tpf: int, bs: int, rr: int, rc: int, crop: bool = True
) -> torch.Tensor:
    k = (tpf - 1) // bs + 1
    if sink:
        local = torch.ones(tpf, tpf, dtype=torch.bool)
    else:
        idx = torch.arange(tpf)
        dist = (idx[None, :] - idx[:, None]).abs()
        # the official int-tensor-vs-Python-float comparison runs in float32
        local = dist.to(torch.float32) <= torch.tensor(w, dtype=torch.float32)
        local = local & kept
    canvas = torch.zeros(rr + k * bs, rc + k * bs, dtype=torch.bool)
    canvas[rr : rr + tpf, rc : rc + tpf] = local
    if crop:
        canvas = canvas[: k * bs, : k * bs]  # shrinkMaskStrict keeps (shape[0] // bs) * bs square
    else:  # counterfactual, only to show that the crop matters: keep the straddling tail
        canvas = torch.nn.functional.pad(canvas, (0, bs - rc, 0, bs - rr))
        k += 1
    out = _oracle_shrink(canvas, bs)
    assert out.shape == (k, k)
    return out


_memo_pair_blocks = functools.lru_cache(maxsize=None)(_oracle_pair_blocks)


def oracle_mask(
    num_frames: int,
    tpf: int,
    *,
    block_size: int = 128,
    decay_factor: float = 1.0,
    model: str = "wan",
    text_tokens: int = 0,
    attention_sink: bool | None = None,
    memo: bool = False,
    crop: bool = True,
) -> torch.Tensor:
    """Official rule, literally, on a ceil(N / bs) grid.

    ``memo`` caches the per-pair canvas computation on *all* of its inputs (used only to make
    the large published configurations affordable; the computation itself is unchanged).
    """
    bs = block_size
    sink_on = (model == "wan") if attention_sink is None else attention_sink
    video = num_frames * tpf
    nb = math.ceil((video + text_tokens) / bs)
    border = video // bs
    alloc = nb if crop else nb + 1
    final = torch.zeros(alloc, alloc, dtype=torch.bool)
    final[border:, :] = True
    final[:, border:] = True
    pair_fn = _memo_pair_blocks if memo else _oracle_pair_blocks
    for i in range(num_frames):
        for j in range(num_frames):
            d = abs(i - j)
            sink = sink_on and j == 0
            w = _oracle_window(d, tpf, bs, decay_factor, model)
            kept = _oracle_pair_kept(d, tpf)
            rr, rc = (i * tpf) % bs, (j * tpf) % bs
            blk = pair_fn(w, sink, kept, tpf, bs, rr, rc, crop)
            r0, c0 = (i * tpf) // bs, (j * tpf) // bs
            k = blk.shape[0]
            assert r0 + k <= alloc and c0 + k <= alloc
            final[r0 : r0 + k, c0 : c0 + k] |= blk
    return final[:nb, :nb]


def _sparsity_pct(mask: torch.Tensor, **kw) -> float:
    return 100.0 * (1.0 - mask_density(mask, **kw))


# ------------------------------------------------------------------------------------------
# fast version == oracle, block for block
# ------------------------------------------------------------------------------------------

_EXPLICIT = [
    # (frames, tpf, block, decay, model, text, sink)
    (4, 128, 128, 1.0, "hunyuan", 0, None),  # decimation of d = 3 (split 2)
    (3, 512, 128, 0.5, "hunyuan", 0, None),  # band clamped at one block
    (5, 200, 64, 1.0, "wan", 0, None),  # tpf not a multiple of the block
    (6, 100, 64, 1.0, "wan", 37, None),  # tpf < 128: even d = 1 decimated; text
    (6, 100, 64, 1.0, "hunyuan", 37, None),
    (7, 60, 16, 0.3, "mochi", 5, None),
    (7, 60, 16, 0.3, "mochi", 5, True),
    (9, 90, 32, 1.0, "hunyuan", 0, True),
    (12, 40, 16, 2.5, "wan", 0, False),
    (20, 24, 16, 1.0, "wan", 0, None),  # many decimation groups
    (17, 130, 32, 0.95, "hunyuan", 64, None),
    (5, 300, 128, 0.2, "wan", 100, None),
    (4, 260, 64, 0.7, "hunyuan", 0, None),
    (3, 1000, 128, 0.95, "hunyuan", 0, None),  # wide bands (w = 972.8 style)
    (10, 192, 64, 0.8, "wan", 0, None),  # Wan2.2-like block 64, decimation still at 128
    (1, 333, 64, 1.0, "wan", 0, None),  # single frame
    (2, 7, 16, 1.0, "hunyuan", 0, None),  # whole video inside one block
    (11, 48, 48, 1.3, "hunyuan", 3, None),  # block divisible by 3 (1/3 threshold edge)
    (6, 256, 96, 0.6, "wan", 0, None),
]


def _random_configs(n: int, seed: int = 1234) -> list[tuple]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        bs = rng.choice([16, 32, 64, 128])
        tpf = rng.randint(5, min(3 * bs + 40, 300))
        frames = rng.randint(1, max(2, min(14, 6000 // (tpf + bs))))
        decay = rng.choice([0.2, 0.5, 0.8, 0.95, 1.0, 1.5, 3.0, round(rng.uniform(0.1, 2.0), 3)])
        model = rng.choice(["wan", "hunyuan", "mochi"])
        text = rng.choice([0, 0, rng.randint(1, 200)])
        sink = rng.choice([None, None, True, False])
        out.append((frames, tpf, bs, decay, model, text, sink))
    return out


@pytest.mark.parametrize(
    "frames,tpf,bs,decay,model,text,sink", _EXPLICIT + _random_configs(40)
)
def test_matches_literal_oracle(frames, tpf, bs, decay, model, text, sink):
    kw = dict(block_size=bs, decay_factor=decay, model=model, text_tokens=text, attention_sink=sink)
    fast = radial_block_mask(frames, tpf, **kw)
    ref = oracle_mask(frames, tpf, **kw)
    assert fast.dtype == torch.bool
    assert fast.shape == (math.ceil((frames * tpf + text) / bs),) * 2
    diff = (fast != ref).nonzero().tolist()
    assert not diff, f"{len(diff)} blocks differ, first {diff[:5]}"


@pytest.mark.parametrize("frames,tpf,bs", [(8, 28, 16), (12, 21, 16), (10, 100, 64)])
def test_per_pair_crop(frames, tpf, bs):
    # A frame whose start is offset in its block overflows K*bs; the official code ignores that
    # tail for the pair (other pairs may still cover the block). These configs are sensitive.
    kw = dict(block_size=bs, model="hunyuan")
    ref = oracle_mask(frames, tpf, **kw)
    assert not torch.equal(ref, oracle_mask(frames, tpf, crop=False, **kw))
    assert torch.equal(radial_block_mask(frames, tpf, **kw), ref)


def test_float32_band_edge_matches_oracle():
    # w = 2**bl(tpf) / 2**bl(d) * decay lands just below an integer: float64 floors to n - 1,
    # the official float32 comparison to n. Pick a config where that changes blocks.
    tpf, bs, frames = 200, 16, 4  # 2**bl(200) = 256; d = 2, 3 -> 64 * decay
    n_found = 0
    for n in range(17, 64):
        decay = (n - 1e-9) / 64.0
        lo = oracle_mask(frames, tpf, block_size=bs, decay_factor=(n - 1) / 64.0, model="hunyuan")
        ref = oracle_mask(frames, tpf, block_size=bs, decay_factor=decay, model="hunyuan")
        fast = radial_block_mask(frames, tpf, block_size=bs, decay_factor=decay, model="hunyuan")
        assert torch.equal(fast, ref)
        n_found += int(not torch.equal(lo, ref))
    assert n_found > 0, "no width in the sweep was sensitive to the float32 rounding"


# ------------------------------------------------------------------------------------------
# hand-checked cases
# ------------------------------------------------------------------------------------------


def _t(rows):
    return torch.tensor(rows, dtype=torch.bool)


def test_hand_decimation_and_sink():
    # tpf = 128: 2**bl = 256. d = 2, 3 -> group 2, L' = 64 < 128 -> split 2: d = 2 kept
    # (full frame: width max(64, 128) = 128 covers it), d = 3 dropped.
    m = radial_block_mask(4, 128, model="hunyuan")
    assert torch.equal(m, _t([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1]]))
    # Wan: the sink makes key frame 0 visible to query frame 3 (and only that way round).
    m = radial_block_mask(4, 128, model="wan")
    assert torch.equal(m, _t([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]]))


def test_hand_band_one_block():
    # tpf = 512 (K = 4), decay 0.5: d = 2 half-width max(1024 / 4 * 0.5, 128) = 128 tokens,
    # which survives the 1/3-0.6 rule on the main block diagonal +- 1 only.
    m = radial_block_mask(3, 512, model="hunyuan", decay_factor=0.5)
    tri = torch.ones(4, 4, dtype=torch.bool).triu(-1).tril(1)
    full = torch.ones(4, 4, dtype=torch.bool)
    expect = torch.cat(
        [
            torch.cat(row, dim=1)
            for row in [[full, full, tri], [full, full, full], [tri, full, full]]
        ]
    )
    assert torch.equal(m, expect)


def test_hand_partial_tail_block():
    # tpf = 100 < 128 with block 64: d = 1 pairs are decimated (L' = 64 -> split 2). Frame 0
    # covers blocks 0-1, frame 1 (tokens 100..199) blocks 1-2 (cropped to K*bs), block 3
    # holds the tail (tokens 192..199) and is dense both ways.
    m = radial_block_mask(2, 100, block_size=64, model="hunyuan")
    assert torch.equal(m, _t([[1, 1, 0, 1], [1, 1, 1, 1], [0, 1, 1, 1], [1, 1, 1, 1]]))
    m = radial_block_mask(2, 100, block_size=64, model="wan")  # sink adds (2, 0)
    assert torch.equal(m, _t([[1, 1, 0, 1], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]]))


def test_small_tpf_keeps_only_diagonal():
    # tpf = 64, block 64: every d >= 1 pair is decimated away; d = 0 always stays.
    m = radial_block_mask(5, 64, block_size=64, model="mochi")
    assert torch.equal(m, torch.eye(5, dtype=torch.bool))
    m = radial_block_mask(5, 64, block_size=64, model="wan")
    expect = torch.eye(5, dtype=torch.bool)
    expect[:, 0] = True
    assert torch.equal(m, expect)


# ------------------------------------------------------------------------------------------
# structural properties
# ------------------------------------------------------------------------------------------


def test_density_falls_as_frames_grow():
    dens = [
        mask_density(radial_block_mask(f, 1560), num_video_tokens=f * 1560)
        for f in (5, 11, 21, 41, 81)
    ]
    assert all(a > b for a, b in zip(dens, dens[1:])), dens
    dens = [
        mask_density(radial_block_mask(f, 200, block_size=32, model="hunyuan"))
        for f in (4, 8, 16, 32)
    ]
    assert all(a > b for a, b in zip(dens, dens[1:])), dens


@pytest.mark.parametrize("model", ["wan", "hunyuan", "mochi"])
def test_text_rows_and_cols_dense(model):
    frames, tpf, bs, text = 9, 300, 64, 77
    m = radial_block_mask(frames, tpf, block_size=bs, model=model, text_tokens=text)
    border = frames * tpf // bs
    assert m.shape[0] == math.ceil((frames * tpf + text) / bs)
    assert m[border:, :].all() and m[:, border:].all()
    assert not m[:border, :border].all()  # the video part is sparse
    # the video part does not depend on the text length
    m0 = radial_block_mask(frames, tpf, block_size=bs, model=model)
    assert torch.equal(m[:border, :border], m0[:border, :border])


def test_sink_column_only_when_on():
    frames, tpf = 33, 256
    for model in ("wan", "hunyuan", "mochi"):
        on = radial_block_mask(frames, tpf, model=model, attention_sink=True)
        off = radial_block_mask(frames, tpf, model=model, attention_sink=False)
        k0 = tpf // 128  # key blocks of frame 0
        assert on[:, :k0].all()
        assert not off[:, :k0].all()
        assert off[:k0 * 3, :k0].all()  # frames 0..2 still see frame 0 (|i-j| <= 1 / d=2 kept)
        # the sink adds blocks only in frame 0's columns
        assert torch.equal(on[:, k0:], off[:, k0:])
    # defaults: sink on for Wan only
    for model, default_sink in (("wan", True), ("hunyuan", False), ("mochi", False)):
        forced = radial_block_mask(frames, tpf, model=model, attention_sink=default_sink)
        assert torch.equal(radial_block_mask(frames, tpf, model=model), forced)


def test_hunyuan_video_is_an_alias_of_hunyuan():
    """The family spelling of the training code names the same rule (same sink default, same cached tensor)."""
    for sink in (None, True, False):
        for args in [(9, 300, 64, 77), (33, 3600, 128, 0)]:
            frames, tpf, bs, text = args
            kw = dict(block_size=bs, text_tokens=text, attention_sink=sink)
            alias = radial_block_mask(frames, tpf, model="hunyuan_video", **kw)
            assert alias is radial_block_mask(frames, tpf, model="hunyuan", **kw)
            if sink is None:
                assert not torch.equal(alias, radial_block_mask(frames, tpf, model="wan", **kw))  # no sink
    assert MODELS["hunyuan_video"] is MODELS["hunyuan"] is False
    with pytest.raises(ValueError, match="hunyuan_video"):  # the error lists it among the choices
        radial_block_mask(4, 128, model="hunyuanvideo")


def test_diagonal_blocks_always_kept():
    for args in [(13, 1560, 128), (9, 3600, 128), (7, 100, 64), (30, 24, 16)]:
        frames, tpf, bs = args
        m = radial_block_mask(frames, tpf, block_size=bs, model="hunyuan", decay_factor=0.1)
        assert m.diagonal().all()


# ------------------------------------------------------------------------------------------
# published figures
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("frames,expected", [(21, 55.08), (41, 70.11), (81, 81.27)])
def test_official_wan_480p_sparsity(frames, expected):
    # Official function at Wan2.1 480p (832x480 -> 1560 tokens/frame), decay 1, sink, ceil grid.
    m = radial_block_mask(frames, 1560, decay_factor=1.0, model="wan")
    assert m.shape[0] == math.ceil(frames * 1560 / 128)
    assert abs(_sparsity_pct(m) - expected) < 0.01


def test_paper_table2_figures():
    # Paper Table 2 (Hunyuan 2x: 64 x 3600 with the first-release sink; Wan 2x: 41 x 3840).
    m = radial_block_mask(64, 3600, model="hunyuan", attention_sink=True)
    assert abs(_sparsity_pct(m, num_video_tokens=64 * 3600) - 80.83) < 0.01
    m = radial_block_mask(41, 3840, model="wan")
    assert abs(_sparsity_pct(m, num_video_tokens=41 * 3840) - 73.61) < 0.01


@pytest.mark.slow
def test_oracle_confirms_published_figures():
    # Memoised oracle at real sizes (tens of seconds): the figures above are the official rule.
    m = oracle_mask(21, 1560, model="wan", memo=True)
    assert torch.equal(m, radial_block_mask(21, 1560, model="wan"))
    m = oracle_mask(41, 3840, model="wan", memo=True)
    assert torch.equal(m, radial_block_mask(41, 3840, model="wan"))


# ------------------------------------------------------------------------------------------
# caching, devices, speed
# ------------------------------------------------------------------------------------------


def test_cached_identity():
    a = radial_block_mask(9, 300, block_size=64)
    b = radial_block_mask(
        9, 300, block_size=64, decay_factor=1, model="wan", attention_sink=True, device="cpu"
    )
    assert a is b
    c = radial_block_mask(9, 300, block_size=64, attention_sink=False)
    assert c is not a
    assert radial_block_mask(9, 300, block_size=64, device=torch.device("cpu")) is a


def test_build_is_fast_on_cpu():
    from sparse_attn.radial import _cached_mask

    _cached_mask.cache_clear()
    t0 = time.perf_counter()
    m = radial_block_mask(81, 1560)
    dt = time.perf_counter() - t0
    assert m.shape == (988, 988)
    assert dt < 1.0, f"81 x 1560 build took {dt:.3f} s"


@pytest.mark.gpu
def test_cuda_matches_cpu_and_is_fast():
    from sparse_attn.radial import _cached_mask

    dev = torch.device("cuda")
    for args in [(21, 1560), (33, 3600)]:
        cpu = radial_block_mask(*args)
        gpu = radial_block_mask(*args, device=dev)
        assert gpu.is_cuda and torch.equal(gpu.cpu(), cpu)
    radial_block_mask(5, 1560, device=dev)  # warm-up (CUDA context, kernels)
    _cached_mask.cache_clear()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    m = radial_block_mask(81, 1560, device=dev)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    assert m.is_cuda and m.shape == (988, 988)
    assert dt < 0.05, f"81 x 1560 build on GPU took {dt * 1e3:.1f} ms"


# ------------------------------------------------------------------------------------------
# mask_density and bad input
# ------------------------------------------------------------------------------------------


def test_mask_density():
    m = torch.zeros(4, 4, dtype=torch.bool)
    m[0, 0] = m[3, 3] = m[2, 3] = True
    assert mask_density(m) == 3 / 16
    # 3 full video blocks of 64 -> top-left 3x3 only
    assert mask_density(m, num_video_tokens=200, block_size=64) == 1 / 9
    assert mask_density(m[None, None].expand(2, 3, 4, 4)) == 3 / 16
    with pytest.raises(TypeError, match="block_mask"):
        mask_density(m.int())
    with pytest.raises(ValueError, match="block_mask"):
        mask_density(torch.zeros(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="num_video_tokens"):
        mask_density(m, num_video_tokens=10, block_size=64)
    with pytest.raises(ValueError, match="num_video_tokens"):
        mask_density(m, num_video_tokens=5 * 64, block_size=64)


@pytest.mark.parametrize(
    "kwargs,exc,name",
    [
        (dict(num_frames=0, tokens_per_frame=10), ValueError, "num_frames"),
        (dict(num_frames=2.0, tokens_per_frame=10), TypeError, "num_frames"),
        (dict(num_frames=True, tokens_per_frame=10), TypeError, "num_frames"),
        (dict(num_frames=2, tokens_per_frame=0), ValueError, "tokens_per_frame"),
        (dict(num_frames=2, tokens_per_frame=10, block_size=8), ValueError, "block_size"),
        (dict(num_frames=2, tokens_per_frame=10, decay_factor=0.0), ValueError, "decay_factor"),
        (dict(num_frames=2, tokens_per_frame=10, decay_factor=math.nan), ValueError, "decay"),
        (dict(num_frames=2, tokens_per_frame=10, decay_factor="1"), TypeError, "decay_factor"),
        (dict(num_frames=2, tokens_per_frame=10, model="cogvideo"), ValueError, "model"),
        (dict(num_frames=2, tokens_per_frame=10, text_tokens=-1), ValueError, "text_tokens"),
        (dict(num_frames=2, tokens_per_frame=10, attention_sink=1), TypeError, "attention_sink"),
        (dict(num_frames=2, tokens_per_frame=10, device="nonsense"), ValueError, "device"),
    ],
)
def test_bad_arguments(kwargs, exc, name):
    args = (kwargs.pop("num_frames"), kwargs.pop("tokens_per_frame"))
    with pytest.raises(exc, match=name):
        radial_block_mask(*args, **kwargs)
