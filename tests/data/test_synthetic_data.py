"""Synthetic videos: real mp4s whose captions say what is on screen (checked from the decoded pixels)."""

from __future__ import annotations

import json
import re

import av
import numpy as np
import pytest

from data.synthetic import BACKGROUNDS, COLORS, main, write_synthetic_dataset
from data.video import probe_video

SENTENCE = re.compile(
    r"^A (?P<color>\w+) (?P<kind>circle|square|triangle|bar) moves (?P<dir>.+?)"
    r"(?:, (?:spinning (?P<spin>clockwise|counterclockwise))?(?: and )?(?:turning (?P<to>\w+))?)?$"
)


def _decode(path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def _centroid(frame: np.ndarray, color: str):
    dist = np.linalg.norm(frame.astype(float) - np.asarray(COLORS[color], float), axis=-1)
    ys, xs = np.nonzero(dist < 45)
    return (xs.mean() / frame.shape[1], ys.mean() / frame.shape[0], len(xs)) if len(xs) else None


def test_captions_describe_the_pixels(tmp_path):
    out = write_synthetic_dataset(tmp_path / "s", 6, 17, 96, 128, fps=8, seed=11)
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [r["file_name"] for r in rows] == [f"video_{i:05d}.mp4" for i in range(6)]
    checked = 0
    for row in rows:
        path = out / row["file_name"]
        info = probe_video(path)
        assert (info.num_frames, info.height, info.width, float(info.fps)) == (17, 96, 128, 8.0)
        with av.open(str(path)) as c:
            assert c.streams.video[0].codec_context.name == "h264" and c.streams.video[0].format.name == "yuv420p"
        frames = _decode(path)
        *shapes, background = [s for s in row["caption"].split(". ") if s]
        bg = re.fullmatch(r"The background is (.+?)\.?", background).group(1)
        assert np.abs(np.median(frames[0].reshape(-1, 3), 0) - BACKGROUNDS[bg]).max() < 20
        parsed = [SENTENCE.match(s.rstrip(".")) for s in shapes]
        assert all(parsed), row["caption"]
        starts = [p["color"] for p in parsed]
        ends = [p["to"] or p["color"] for p in parsed]
        for p, c0, c1 in zip(parsed, starts, ends):
            if starts.count(c0) > 1 or ends.count(c1) > 1:
                continue  # two shapes share a colour: the centroid would mix them
            a, b = _centroid(frames[0], c0), _centroid(frames[-1], c1)
            assert a is not None and b is not None and a[2] > 30 and b[2] > 30, (row["caption"], a, b)
            dx, dy = b[0] - a[0], b[1] - a[1]
            words = p["dir"]
            if "to the right" in words or words.endswith("right"):
                assert dx > 0.05
            if "to the left" in words or words.endswith("left"):
                assert dx < -0.05
            if "to the bottom" in words or "toward the bottom" in words:
                assert dy > 0.05
            if "to the top" in words or "toward the top" in words:
                assert dy < -0.05
            checked += 1
    assert checked >= 4


def test_same_seed_same_videos(tmp_path):
    a = write_synthetic_dataset(tmp_path / "a", 2, 9, 32, 48, fps=16, seed=5)
    b = write_synthetic_dataset(tmp_path / "b", 2, 9, 32, 48, fps=16, seed=5)
    c = write_synthetic_dataset(tmp_path / "c", 2, 9, 32, 48, fps=16, seed=6)
    assert (a / "metadata.jsonl").read_text() == (b / "metadata.jsonl").read_text()
    assert (a / "metadata.jsonl").read_text() != (c / "metadata.jsonl").read_text()
    np.testing.assert_array_equal(_decode(a / "video_00001.mp4"), _decode(b / "video_00001.mp4"))
    assert not list(a.glob(".*tmp*"))  # temp names were renamed away


def test_cli(tmp_path, capsys):
    main(["--out", str(tmp_path / "cli"), "--num-videos", "2", "--frames", "5", "--size", "32x48", "--fps", "24"])
    assert "wrote 2 videos" in capsys.readouterr().out
    info = probe_video(tmp_path / "cli" / "video_00001.mp4")
    assert (info.num_frames, info.height, info.width, float(info.fps)) == (5, 32, 48, 24.0)
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "x"), "--num-videos", "1", "--frames", "5", "--size", "32by48"])
    with pytest.raises(ValueError, match="even"):
        write_synthetic_dataset(tmp_path / "odd", 1, 5, 33, 48)
    with pytest.raises(ValueError, match="num_videos must be a positive int"):
        write_synthetic_dataset(tmp_path / "zero", 0, 5, 32, 48)
