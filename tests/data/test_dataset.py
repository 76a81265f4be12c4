"""build_dataset: skip accounting, errors when configured, worker-side failures, DataLoader with workers."""

from __future__ import annotations

import av
import numpy as np
import pytest
import torch

from data.config import DataConfig
from data.dataset import SKIP_REASONS, SkipReport, build_dataset, collate_clips, make_dataloader
from data.video import resample_indices
from video_helpers import frame_index_of, write_metadata


def _cfg(path, **kw) -> DataConfig:
    base = dict(path=str(path), frames=9, fps=16, height=32, width=32, num_workers=0)
    base.update(kw)
    return DataConfig(**base)


@pytest.fixture
def messy_folder(tmp_path, make_video):
    """2 good videos, and one of each problem the scan must count."""
    folder = tmp_path / "messy"
    make_video("good0.mp4", frames=20, folder=folder)
    make_video("good1.mp4", frames=12, folder=folder)
    make_video("short.mp4", frames=8, folder=folder)  # 9 frames needed
    make_video("wide.mp4", frames=12, height=32, width=96, folder=folder)  # aspect 3 vs 1
    make_video("nocap.mp4", frames=12, folder=folder)
    (folder / "corrupt.mp4").write_bytes(np.random.default_rng(1).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    cut = make_video("truncated.mp4", frames=30, content="noise", folder=folder)
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    write_metadata(folder, [
        {"file_name": "good0.mp4", "caption": "good zero"},
        {"file_name": "good1.mp4", "caption": "good one"},
        {"file_name": "short.mp4", "caption": "too short"},
        {"file_name": "wide.mp4", "caption": "too wide"},
        {"file_name": "nocap.mp4", "caption": None},
        {"file_name": "corrupt.mp4", "caption": "corrupt"},
        {"file_name": "truncated.mp4", "caption": "truncated"},
        {"file_name": "missing.mp4", "caption": "file not there"},
    ])
    return folder


def test_every_skipped_video_is_counted_by_reason(messy_folder):
    ds, report = build_dataset(_cfg(messy_folder, max_aspect_change=0.5), 4, seed=0)
    assert report.skipped == {"too_short": 1, "unreadable": 3, "aspect": 1, "missing_caption": 1}
    assert (report.videos, report.kept, report.clips, len(ds)) == (8, 2, 2, 2)
    assert report.videos == report.kept + report.total_skipped
    text = report.summary()
    for name in ("short.mp4", "wide.mp4", "nocap.mp4", "corrupt.mp4", "truncated.mp4", "missing.mp4"):
        assert name in text
    assert "8 frames at the target fps, the shortest bucket needs 9" in text
    assert report.as_dict()["data/skipped_unreadable"] == 3
    # without an aspect limit the wide video is centre-cropped instead
    _, loose = build_dataset(_cfg(messy_folder), 4, seed=0)
    assert loose.skipped["aspect"] == 0 and loose.kept == 3


@pytest.mark.parametrize(
    "bad,reason",
    [("short.mp4", "too_short"), ("corrupt.mp4", "unreadable"), ("nocap.mp4", "missing_caption"), ("wide.mp4", "aspect")],
)
def test_on_bad_video_error_names_file_and_reason(tmp_path, messy_folder, bad, reason):
    import json

    rows = [json.loads(line) for line in (messy_folder / "metadata.jsonl").read_text().splitlines()]
    folder = messy_folder
    write_metadata(folder, [r for r in rows if r["file_name"] in ("good0.mp4", bad)])
    with pytest.raises(ValueError, match=rf"{bad}: {reason} \(.*on_bad_video='skip'"):
        build_dataset(_cfg(folder, on_bad_video="error", max_aspect_change=0.5), 4, seed=0)


def test_frames_must_fit_the_family(synthetic_dir):
    with pytest.raises(ValueError, match=r"data\.frames=32 is not of the form 4k\+1.*29 or 33"):
        build_dataset(_cfg(synthetic_dir, frames=32), 4, seed=0)
    with pytest.raises(ValueError, match=r"data\.frames=33 is not of the form 6k\+1.*31 or 37"):
        build_dataset(_cfg(synthetic_dir, frames=33), 6, seed=0)
    with pytest.raises(ValueError, match=r"data\.crop must be one of"):
        build_dataset(_cfg(synthetic_dir, crop="left"), 4, seed=0)
    with pytest.raises(ValueError, match=r"data\.clips_per_video > 1 needs"):
        build_dataset(_cfg(synthetic_dir, clips_per_video=2), 4, seed=0)


def test_clip_pixels_match_an_independent_decode(tmp_path, make_video):
    """No resize (same size), centre crop, 30 -> 16 fps: pixels == plain PyAV frames at the planned indices."""
    path = make_video("v.mp4", frames=40, fps=30, height=32, width=48, content="noise", folder=tmp_path / "d")
    write_metadata(tmp_path / "d", [{"file_name": "v.mp4", "caption": "noise"}])
    ds, _ = build_dataset(_cfg(tmp_path / "d", frames=17, height=32, width=32), 4, seed=0)
    with av.open(str(path)) as c:
        ref = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    idx = resample_indices(17, 30, 16)
    expect = torch.from_numpy(ref[idx][:, :, 8:40]).permute(3, 0, 1, 2).float() / 127.5 - 1
    item = ds[0]
    assert item["pixels"].shape == (3, 17, 32, 32) and item["start_frame"] == 0
    torch.testing.assert_close(item["pixels"], expect, atol=1e-6, rtol=0)


def test_chunks_and_random_starts(tmp_path, make_video):
    make_video("v.mp4", frames=40, fps=16, folder=tmp_path / "d")
    write_metadata(tmp_path / "d", [{"file_name": "v.mp4", "caption": "counting"}])
    ds, report = build_dataset(_cfg(tmp_path / "d", start="chunks", clips_per_video=3), 4, seed=0)
    assert report.clips == 3 and [ds[i]["start_frame"] for i in range(3)] == [0, 16, 31]
    for i in range(3):  # the brightness code says which source frames each clip holds
        got = frame_index_of(ds[i]["pixels"].numpy())
        assert got == list(range(ds[i]["start_frame"], ds[i]["start_frame"] + 9))
    rnd, _ = build_dataset(_cfg(tmp_path / "d", start="random", crop="random", clips_per_video=2), 4, seed=7)
    a, b = rnd[(1, 0)], rnd[(1, 0)]
    torch.testing.assert_close(a["pixels"], b["pixels"])  # same (index, epoch): same clip
    starts = {rnd[(1, e)]["start_frame"] for e in range(8)}
    assert len(starts) > 1 and all(0 <= s <= 31 for s in starts)


def test_buckets_route_videos(tmp_path, make_video):
    folder = tmp_path / "b"
    make_video("long.mp4", frames=40, folder=folder)
    make_video("mid.mp4", frames=20, folder=folder)
    make_video("tall.mp4", frames=20, height=48, width=32, folder=folder)
    write_metadata(folder, [{"file_name": n, "caption": n} for n in ("long.mp4", "mid.mp4", "tall.mp4")])
    cfg = _cfg(folder, frames=33, height=32, width=32, buckets=[[17, 32, 32], [17, 48, 32]])
    ds, report = build_dataset(cfg, 4, seed=0)
    assert report.clips_per_bucket == {"33x32x32": 1, "17x32x32": 1, "17x48x32": 1}
    shapes = {ds[i]["key"]: tuple(ds[i]["pixels"].shape) for i in range(3)}
    assert shapes == {"long.mp4": (3, 33, 32, 32), "mid.mp4": (3, 17, 32, 32), "tall.mp4": (3, 17, 48, 32)}


def test_dataloader_two_workers_same_bucket_batches(synthetic_dir):
    cfg = _cfg(synthetic_dir, frames=17, fps=16, height=32, width=48, buckets=[[9, 32, 48]], start="chunks", clips_per_video=2)
    ds, report = build_dataset(cfg, 4, seed=0)
    assert report.clips == 12  # 6 videos x 2 chunks (33 frames each)
    batches = list(make_dataloader(ds, cfg, batch_size=4, seed=3, epoch=1, num_workers=2))
    assert [b["batch_size"] for b in batches] == [4, 4, 4]
    for b in batches:
        assert b["pixels"].shape == (4, 3, 17, 32, 48) and b["pixels"].dtype == torch.float32
        assert -1.0 <= b["pixels"].min() and b["pixels"].max() <= 1.0
        assert b["bucket"] == b["clip_shape"] == (17, 32, 48) and len(b["captions"]) == 4 and b["failed"] == []
    assert sorted(i for b in batches for i in b["indices"]) == list(range(12))
    # same order and content in the main process (no workers): workers change nothing
    single = list(make_dataloader(ds, cfg, batch_size=4, seed=3, epoch=1, num_workers=0))
    for x, y in zip(batches, single):
        assert x["keys"] == y["keys"]
        torch.testing.assert_close(x["pixels"], y["pixels"])
    # two ranks split the epoch; a resumed rank skips what it already consumed
    ranks = [list(make_dataloader(ds, cfg, batch_size=2, seed=3, epoch=1, rank=r, world_size=2)) for r in (0, 1)]
    assert [len(r) for r in ranks] == [3, 3]
    assert sorted(i for r in ranks for b in r for i in b["indices"]) == list(range(12))
    resumed = list(make_dataloader(ds, cfg, batch_size=2, seed=3, epoch=1, rank=1, world_size=2, skip_batches=2))
    assert [b["indices"] for b in resumed] == [b["indices"] for b in ranks[1][2:]]


def test_decode_failure_in_worker_is_counted_not_silent(tmp_path, make_video):
    folder = tmp_path / "w"
    for i in range(3):
        make_video(f"ok{i}.mp4", frames=30, folder=folder)
    cut = make_video("cut.mp4", frames=30, content="noise", faststart=True, folder=folder)  # probes fine
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 3])
    write_metadata(folder, [{"file_name": n, "caption": n} for n in ("ok0.mp4", "cut.mp4", "ok1.mp4", "ok2.mp4")])
    cfg = _cfg(folder, frames=29)
    ds, report = build_dataset(cfg, 4, seed=0)
    assert report.total_skipped == 0 and len(ds) == 4  # the index promises 30 frames
    loader = make_dataloader(ds, batch_size=2, num_workers=2, shuffle=False)
    batches = list(loader)
    assert [b["batch_size"] for b in batches] == [2, 2]  # the bad clip was replaced: shapes stay fixed
    for b in batches:
        report.record_failures(b["failed"])
    assert report.decode_failures == 1 and list(report.failed_videos) == ["cut.mp4"]
    assert "got" in report.failed_videos["cut.mp4"] and report.as_dict()["data/decode_failures"] == 1
    assert "decode failures during training: 1" in report.summary()
    # configured to fail: the worker's error reaches the main process, naming the file
    strict, _ = build_dataset(_cfg(folder, frames=29, on_bad_video="error"), 4, seed=0)
    with pytest.raises(RuntimeError, match=r"cut.mp4: decode_error"):
        list(make_dataloader(strict, batch_size=2, num_workers=2, shuffle=False))


def test_collate_drops_markers_and_rejects_mixed_shapes():
    item = lambda f, key: {"pixels": torch.zeros(3, f, 4, 4), "caption": key, "key": key, "index": 0, "clip": 0,
                           "bucket": (f, 4, 4), "bucket_index": 0, "failed": []}
    marker = {"pixels": None, "failed": [{"key": "bad.mp4", "reason": "decode_error", "error": "x"}], "bucket": (5, 4, 4)}
    out = collate_clips([item(5, "a"), marker])
    assert out["batch_size"] == 1 and out["pixels"].shape == (1, 3, 5, 4, 4) and out["failed"][0]["key"] == "bad.mp4"
    empty = collate_clips([marker])
    assert empty["batch_size"] == 0 and empty["pixels"] is None and len(empty["failed"]) == 1
    with pytest.raises(ValueError, match="mixes clip shapes"):
        collate_clips([item(5, "a"), item(9, "b")])


def test_skip_report_rejects_unknown_reason():
    r = SkipReport()
    assert set(r.skipped) == set(SKIP_REASONS)
    with pytest.raises(ValueError, match="unknown skip reason"):
        r.add("bored", "x.mp4", "")
