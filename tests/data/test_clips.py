"""Frame-count arithmetic (4k+1 / 6k+1), clip start planning, resize/crop geometry, pixel tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data.clips import (
    aspect_change,
    available_frames,
    check_frame_count,
    clip_indices,
    clip_starts,
    floor_frame_count,
    is_valid_frame_count,
    latent_frame_count,
    max_start,
    nearest_frame_counts,
    pixels_to_float,
    resize_crop,
    to_pixels,
)


@pytest.mark.parametrize(
    "multiple,valid,invalid",
    [
        (4, [1, 5, 33, 81, 161, 321], [0, 2, 4, 80, 82, 320]),
        (6, [1, 7, 85, 163, 325], [0, 6, 81, 84, 161, 321]),
    ],
)
def test_valid_frame_counts(multiple, valid, invalid):
    for n in valid:
        assert is_valid_frame_count(n, multiple)
        assert floor_frame_count(n, multiple) == n
        assert nearest_frame_counts(n, multiple) == (n, n)
    for n in invalid:
        assert not is_valid_frame_count(n, multiple)
    # brute force: the k*m+1 neighbours of every n
    for n in range(1, 400):
        lo, hi = nearest_frame_counts(n, multiple)
        forms = [k * multiple + 1 for k in range(400)]
        assert lo == max(f for f in forms if f <= n) and hi == min(f for f in forms if f >= n)


def test_latent_frame_count():
    assert latent_frame_count(81, 4) == 21 and latent_frame_count(321, 4) == 81
    assert latent_frame_count(163, 6) == 28 and latent_frame_count(1, 6) == 1
    with pytest.raises(ValueError):
        latent_frame_count(80, 4)


def test_check_frame_count_names_setting_and_nearest_values():
    with pytest.raises(ValueError, match=r"data\.frames=80 is not of the form 4k\+1.*nearest valid values: 77 or 81"):
        check_frame_count(80, 4, "data.frames")
    with pytest.raises(ValueError, match=r"data\.frames=81 is not of the form 6k\+1.*79 or 85"):
        check_frame_count(81, 6, "data.frames")
    with pytest.raises(TypeError, match="data.frames must be an int"):
        check_frame_count(81.0, 4, "data.frames")  # type: ignore[arg-type]
    check_frame_count(161, 4, "data.frames")


def test_available_frames_and_max_start_agree():
    for n, src, dst in [(33, 16, 16), (150, 30, 16), (100, 24, 16), (20, 8, 16)]:
        f = available_frames(n, src, dst)
        assert max_start(n, src, f, dst) >= 0
        assert max_start(n, src, f + 1, dst) == -1
    # 5 s at 30 fps is 150 frames: 81 frames at 16 fps span 5.0 s and need frame 150 -> one short
    assert available_frames(150, 30, 16) == 80 and available_frames(151, 30, 16) == 81


def test_clip_starts_modes():
    n, src, frames, fps = 100, 30, 17, 16
    hi = max_start(n, src, frames, fps)
    assert hi == n - 1 - clip_indices(0, frames, src, fps)[-1]
    assert clip_starts(n, src, frames, fps, "start") == [0]
    chunks = clip_starts(n, src, frames, fps, "chunks", 4)
    assert chunks[0] == 0 and chunks[-1] == hi and len(chunks) == 4
    gaps = np.diff(chunks)
    assert gaps.max() - gaps.min() <= 1  # evenly spaced
    for s in chunks:
        assert clip_indices(s, frames, src, fps)[-1] <= n - 1
    draws = clip_starts(n, src, frames, fps, "random", 50, np.random.default_rng(0))
    assert len(draws) == 50 and min(draws) >= 0 and max(draws) <= hi and len(set(draws)) > 10
    # fewer distinct starts than requested chunks: no duplicates
    assert clip_starts(18, 16, 17, 16, "chunks", 5) == [0, 1]
    assert clip_starts(10, 16, 17, 16, "start") == []  # too short
    with pytest.raises(ValueError, match="rng"):
        clip_starts(n, src, frames, fps, "random")
    with pytest.raises(ValueError, match="start must be"):
        clip_starts(n, src, frames, fps, "middle")  # type: ignore[arg-type]


def test_resize_crop_covers_target():
    tf = resize_crop(480, 854, 480, 832)  # 16:9 -> Wan 480p: no scaling, crop 11 px each side
    assert (tf.resize_h, tf.resize_w, tf.top, tf.left) == (480, 854, 0, 11)
    tf = resize_crop(1080, 1920, 480, 832)  # scale by max(480/1080, 832/1920)
    assert (tf.resize_h, tf.resize_w) == (480, 853) and tf.left == 10
    tf = resize_crop(64, 64, 32, 48)  # square -> landscape: width decides
    assert (tf.resize_h, tf.resize_w, tf.top, tf.left) == (48, 48, 8, 0)
    same = {(t.top, t.left) for t in (resize_crop(100, 100, 50, 50, "random", np.random.default_rng(s)) for s in range(9))}
    assert same == {(0, 0)}  # same aspect: scaled exactly, nothing to crop
    offs = [resize_crop(60, 200, 30, 30, "random", np.random.default_rng(s)) for s in range(40)]
    assert all(0 <= t.left <= t.resize_w - 30 and t.top == 0 for t in offs) and len({t.left for t in offs}) > 5


def test_aspect_change_is_symmetric():
    assert aspect_change(480, 832, 480, 832) == 0.0
    assert aspect_change(480, 640, 480, 853) == pytest.approx(aspect_change(480, 853, 480, 640))
    assert aspect_change(100, 200, 100, 100) == pytest.approx(1.0)


def test_to_pixels_layout_and_range():
    frames = np.random.default_rng(0).integers(0, 256, (5, 4, 6, 3), dtype=np.uint8)
    frames[0, 0, 0] = [0, 255, 128]
    x = to_pixels(frames)
    assert x.shape == (3, 5, 4, 6) and x.dtype == torch.float32 and x.is_contiguous()
    assert x[:, 0, 0, 0].tolist() == pytest.approx([-1.0, 1.0, 128 / 127.5 - 1], abs=1e-6)
    ref = torch.from_numpy(frames).double().permute(3, 0, 1, 2) / 127.5 - 1
    torch.testing.assert_close(x.double(), ref, atol=1e-6, rtol=0)
    u8 = to_pixels(frames, torch.uint8)
    assert u8.dtype == torch.uint8 and u8.shape == (3, 5, 4, 6)
    torch.testing.assert_close(pixels_to_float(u8), x)
    assert to_pixels(frames, torch.bfloat16).dtype == torch.bfloat16
    cf = np.ascontiguousarray(frames.transpose(3, 0, 1, 2))
    torch.testing.assert_close(to_pixels(cf, channels_first=True), x)
    with pytest.raises(ValueError, match=r"uint8 \[3, F, H, W\]"):
        to_pixels(frames, channels_first=True)
    with pytest.raises(ValueError, match="uint8 or floating"):
        to_pixels(frames, torch.int32)
    with pytest.raises(ValueError, match="uint8"):
        to_pixels(frames.astype(np.float32))
