"""Every source layout, read through `datasets` offline; a saved / parquet dataset stands in for the Hub."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from data.config import DataConfig
from data.dataset import build_dataset
from data.sources import ArrowVideo, load_samples
from data.video import probe_video
from video_helpers import write_metadata


@pytest.fixture
def three_videos(tmp_path, make_video):
    folder = tmp_path / "videos"
    for i in range(3):
        make_video(f"clip{i}.mp4", frames=9 + i, folder=folder)
    return folder


def _check(samples, folder, captions):
    assert [s.caption for s in samples] == captions
    for s in samples:
        if s.video is not None and not isinstance(s.video, ArrowVideo):
            assert Path(s.video).parent == folder
    return samples


def test_metadata_jsonl(three_videos):
    write_metadata(three_videos, [
        {"file_name": "clip0.mp4", "caption": " a cat "},
        {"file_name": "clip1.mp4", "caption": ""},
        {"file_name": "clip2.mp4"},
    ])
    samples = _check(load_samples(str(three_videos)), three_videos, ["a cat", None, None])
    assert [s.key for s in samples] == ["clip0.mp4", "clip1.mp4", "clip2.mp4"]
    assert probe_video(samples[2].video).num_frames == 11


def test_metadata_csv_with_video_and_text_columns(three_videos):
    (three_videos / "metadata.csv").write_text('video,text\nclip0.mp4,"a dog, running"\nclip2.mp4,\n')
    _check(load_samples(str(three_videos)), three_videos, ["a dog, running", None])


def test_metadata_json_list_and_explicit_columns(three_videos):
    rows = [{"clip": "clip1.mp4", "prompt": "p1", "caption": "c1"}, {"clip": "clip0.mp4", "prompt": "p0", "caption": "c0"}]
    (three_videos / "metadata.json").write_text(json.dumps(rows))
    samples = load_samples(str(three_videos), video_column="clip", caption_column="prompt")
    _check(samples, three_videos, ["p1", "p0"])
    with pytest.raises(ValueError, match=r"data\.video_column='nope' is not a column .*\['clip', 'prompt', 'caption'\]"):
        load_samples(str(three_videos), video_column="nope")
    (three_videos / "metadata.json").write_text(json.dumps([{"clip": "clip0.mp4", "words": "x"}]))
    with pytest.raises(ValueError, match=r"none of the columns \['file_name', 'video', 'path'\]; set data\.video_column"):
        load_samples(str(three_videos))


def test_txt_caption_beside_each_video(three_videos, make_video):
    (three_videos / "clip0.txt").write_text("first\n")
    (three_videos / "clip2.txt").write_text("  ")
    make_video("sub/clip3.mp4", folder=three_videos)
    (three_videos / "sub" / "clip3.txt").write_text("nested")
    samples = load_samples(str(three_videos))
    assert [(s.key, s.caption) for s in samples] == [
        ("clip0.mp4", "first"), ("clip1.mp4", None), ("clip2.mp4", None), ("sub/clip3.mp4", "nested"),
    ]


def _video_table(folder: Path, names: list[str], captions: list) -> datasets.Dataset:
    feats = datasets.Features({"video": datasets.Video(decode=False), "caption": datasets.Value("string")})
    rows = {"video": [{"bytes": (folder / n).read_bytes(), "path": n} for n in names], "caption": captions}
    return datasets.Dataset.from_dict(rows, features=feats)


def test_saved_dataset_with_video_bytes(three_videos, tmp_path):
    saved = tmp_path / "saved"
    _video_table(three_videos, ["clip0.mp4", "clip1.mp4"], ["zero", None]).save_to_disk(str(saved))
    samples = load_samples(str(saved))
    assert [(s.key, s.caption) for s in samples] == [("clip0.mp4", "zero"), ("clip1.mp4", None)]
    assert isinstance(samples[0].video, ArrowVideo)
    assert probe_video(samples[0].video).num_frames == 9  # decoded from the Arrow bytes
    dd = tmp_path / "saved_dict"
    datasets.DatasetDict({"validation": _video_table(three_videos, ["clip2.mp4"], ["two"])}).save_to_disk(str(dd))
    assert [s.caption for s in load_samples(str(dd), split="validation")] == ["two"]
    with pytest.raises(ValueError, match=r"data\.split='train' is not in .*\['validation'\]"):
        load_samples(str(dd))


@pytest.mark.parametrize("streaming", [False, True])
def test_hub_like_parquet_dataset(three_videos, tmp_path, streaming):
    """A Hub dataset repo layout (data/train-*.parquet with a Video column), loaded by load_dataset(path)."""
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    _video_table(three_videos, ["clip0.mp4", "clip1.mp4", "clip2.mp4"], ["a", "b", None]).to_parquet(
        str(repo / "data" / "train-00000-of-00001.parquet")
    )
    cache = tmp_path / "hf_cache"
    samples = load_samples(str(repo), streaming=streaming, cache_dir=str(cache))
    assert [(s.key, s.caption) for s in samples] == [("clip0.mp4", "a"), ("clip1.mp4", "b"), ("clip2.mp4", None)]
    assert [probe_video(s.video).num_frames for s in samples] == [9, 10, 11]
    if streaming:  # streamed bytes land in local files, reused by the next run
        files = sorted((cache / "streamed_videos").rglob("*.mp4"))
        assert len(files) == 3
        mtimes = [f.stat().st_mtime_ns for f in files]
        load_samples(str(repo), streaming=True, cache_dir=str(cache))
        assert [f.stat().st_mtime_ns for f in files] == mtimes


def test_every_source_decodes_through_build_dataset(three_videos, tmp_path):
    saved = tmp_path / "saved"
    _video_table(three_videos, ["clip0.mp4", "clip2.mp4"], ["zero", "two"]).save_to_disk(str(saved))
    cfg = DataConfig(path=str(saved), frames=9, fps=16, height=16, width=16, num_workers=0)
    ds, report = build_dataset(cfg, 4, seed=0)
    assert report.clips == 2 and len(ds) == 2
    assert ds[1]["pixels"].shape == (3, 9, 16, 16) and ds[1]["caption"] == "two"


def test_bad_paths(tmp_path):
    with pytest.raises(ValueError, match="data.path is empty"):
        load_samples("")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="is a folder without metadata.jsonl"):
        load_samples(str(tmp_path / "empty"))
    (tmp_path / "f.mp4").write_bytes(b"x")
    with pytest.raises(ValueError, match="must be a folder or a Hub dataset id, not a file"):
        load_samples(str(tmp_path / "f.mp4"))
    with pytest.raises(ValueError, match="does not exist .it names a local path"):
        load_samples(str(tmp_path / "missing" / "deep" / "x"))
