"""PyAV probing/decoding and fps resampling, checked against plain PyAV decodes and brute force."""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np
import pytest

from data.synthetic import write_mp4
from data.video import (
    FrameTransform,
    VideoDecodeError,
    decode_frames,
    max_resampled_frames,
    probe_video,
    resample_indices,
)
from video_helpers import frame_index_of


def reference_decode(path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def brute_nearest(num_out: int, src: float, dst: float, start: int = 0) -> list[int]:
    """Independent oracle: scan all candidate source frames, nearest timestamp, ties to the earlier."""
    out = []
    for j in range(num_out):
        t = Fraction(j) / Fraction(dst).limit_denominator(1001)
        cands = range(start, start + int(t * Fraction(src).limit_denominator(1001)) + 3)
        out.append(min(cands, key=lambda i: (abs(Fraction(i - start) / Fraction(src).limit_denominator(1001) - t), i)))
    return out


@pytest.mark.parametrize("fps", [16, 24, 30000 / 1001])
def test_probe_reports_exact_counts_rate_and_size(make_video, fps):
    path = make_video("a.mp4", frames=21, fps=fps, height=32, width=48)
    info = probe_video(path)
    assert (info.num_frames, info.height, info.width) == (21, 32, 48)
    assert info.fps == Fraction(fps).limit_denominator(1001)
    assert info.start_time == 0.0 and info.rotation == 0 and info.codec == "h264"


def test_probe_counts_packets_when_container_has_no_index(make_video):
    path = make_video("a.mkv", frames=19, container_format="matroska")
    with av.open(str(path)) as c:
        assert c.streams.video[0].frames == 0  # matroska: no frame count in the header
    assert probe_video(path).num_frames == 19 == len(reference_decode(path))


@pytest.mark.parametrize(
    "indices",
    [[0, 1, 2], [9], [5, 5, 6, 6, 7], [20, 21, 25, 25, 39], [30, 35, 39], list(range(40))],
)
def test_decode_returns_exactly_the_requested_frames(make_video, indices):
    # keyframe every 8 frames and B-frames: exercises seeking and reordering
    path = make_video("a.mp4", frames=40, fps=30, content="noise", options={"x264-params": "keyint=8:min-keyint=8"})
    ref = reference_decode(path)
    got = decode_frames(path, indices, probe_video(path))
    assert got.dtype == np.uint8 and got.shape == (len(indices), 32, 32, 3)
    np.testing.assert_array_equal(got, ref[indices])
    cf = decode_frames(path, indices, probe_video(path), channels_first=True)
    np.testing.assert_array_equal(cf, ref[indices].transpose(3, 0, 1, 2))


def test_decode_resize_and_crop(tmp_path):
    # gray noise in 2x2 blocks: survives 4:2:0 chroma, so a 2x area downscale is a 2x2 block mean
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (6, 16, 32, 1)).repeat(2, 1).repeat(2, 2).repeat(3, 3).astype(np.uint8)
    path = write_mp4(tmp_path / "a.mp4", arr, 16)
    ref = reference_decode(path)
    info = probe_video(path)
    same = decode_frames(path, [1, 4], info, FrameTransform(32, 64, 4, 10, 24, 40))
    np.testing.assert_array_equal(same, ref[[1, 4], 4:28, 10:50])
    small = decode_frames(path, [2], info, FrameTransform(16, 32, 0, 8, 16, 16))
    assert small.shape == (1, 16, 16, 3)
    blocks = ref[2].astype(float).reshape(16, 2, 32, 2, 3).mean(axis=(1, 3))[:, 8:24]
    assert np.abs(small[0].astype(float) - blocks).mean() < 3.0  # antialiased, not point-sampled
    big = decode_frames(path, [3], info, FrameTransform(64, 128, 16, 32, 32, 64))  # 2x upscale
    pooled = big[0].astype(float).reshape(16, 2, 32, 2, 3).mean(axis=(1, 3))  # back down to source scale
    assert np.abs(pooled - ref[3, 8:24, 16:48]).mean() < 12
    assert np.abs(pooled - ref[3, 10:26, 18:50]).mean() > 30  # a misplaced crop would be far off


@pytest.mark.parametrize(
    "src,dst",
    [(30, 16), (24, 16), (16, 16), (12, 16), (8, 24), (30000 / 1001, 16), (25, 30000 / 1001)],
)
def test_resample_indices_match_brute_force_nearest_timestamp(src, dst):
    for start in (0, 7):
        assert resample_indices(33, src, dst, start) == brute_nearest(33, src, dst, start)


def test_resample_up_and_down_examples():
    assert resample_indices(6, 30, 15) == [0, 2, 4, 6, 8, 10]  # down: every other frame
    assert resample_indices(6, 8, 16) == [0, 0, 1, 1, 2, 2]  # up: repeats, ties keep the earlier frame
    assert resample_indices(5, 30, 16) == [0, 2, 4, 6, 7]  # 1.875 per output frame; 7.5 is a tie -> 7


@pytest.mark.parametrize("src,dst", [(30, 16), (16, 16), (12, 16), (24, 10), (30000 / 1001, 16)])
def test_max_resampled_frames_is_the_longest_clip_that_fits(src, dst):
    for n in (1, 2, 17, 33, 81, 100):
        f = max_resampled_frames(n, src, dst)
        assert resample_indices(f, src, dst)[-1] <= n - 1
        assert resample_indices(f + 1, src, dst)[-1] > n - 1


@pytest.mark.parametrize("src_fps,dst_fps", [(30, 12), (8, 16)])
def test_decoded_clip_follows_the_resampling_plan(make_video, src_fps, dst_fps):
    """End to end: the brightness code of each decoded frame names the source frame picked."""
    path = make_video("a.mp4", frames=40, fps=src_fps)
    info = probe_video(path)
    n = min(max_resampled_frames(40, src_fps, dst_fps), 25)
    plan = resample_indices(n, src_fps, dst_fps, start=3)
    if plan[-1] > 39:
        plan = resample_indices(n - 4, src_fps, dst_fps, start=3)
    assert frame_index_of(decode_frames(path, plan, info)) == plan


def test_corrupt_file_is_unreadable(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(VideoDecodeError, match="bad.mp4"):
        probe_video(bad)


def test_truncated_mp4_without_index_is_unreadable(make_video):
    path = make_video("cut.mp4", frames=30, content="noise")  # index (moov) at the end
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(VideoDecodeError, match="cut.mp4"):
        probe_video(path)


def test_truncated_faststart_mp4_probes_but_fails_to_decode_late_frames(make_video):
    path = make_video("cut.mp4", frames=30, content="noise", faststart=True)  # index first
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    info = probe_video(path)
    assert info.num_frames == 30  # the index still promises every frame
    with pytest.raises(VideoDecodeError, match=r"cut.mp4: got \d+ of 3 frames"):
        decode_frames(path, [0, 15, 29], info)


def test_rotation_metadata_is_applied(tmp_path):
    arr = np.zeros((3, 32, 64, 3), np.uint8)
    arr[:, :8, :16] = 255  # white block top-left of the stored frame
    path = tmp_path / "rot.mp4"
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=16)
        s.width, s.height, s.pix_fmt = 64, 32, "yuv420p"
        s.set_display_rotation(90)  # counter-clockwise
        for a in arr:
            for p in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    info = probe_video(path)
    assert (info.rotation, info.width, info.height) == (90, 32, 64)
    out = decode_frames(path, [0], info)[0]
    assert out.shape == (64, 32, 3)
    ys, xs = np.nonzero(out[..., 0] > 128)  # rotated 90 degrees CCW: the block is now bottom-left
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (48, 63, 0, 7)


def test_decode_rejects_bad_indices(make_video):
    path = make_video("a.mp4", frames=5)
    info = probe_video(path)
    with pytest.raises(ValueError, match="non-decreasing"):
        decode_frames(path, [3, 1], info)
    with pytest.raises(ValueError, match="empty"):
        decode_frames(path, [], info)
