"""Hostile data (issue 16, item 6 and the PyAV part of item 7): every broken input is one message that names the
file (and line) and says what was expected; nothing is sent to the Hub for a path that looks local."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from data.dataset import build_dataset
from data.config import DataConfig
from data.hub_ids import looks_local
from data.sources import load_samples
from data.synthetic import write_synthetic_dataset
from data.video import probe_video, VideoDecodeError


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("hostile") / "v", num_videos=2, frames=9, height=32, width=32)


def _folder(tmp_path: Path, videos: Path) -> Path:
    folder = tmp_path / "set"
    folder.mkdir()
    for p in videos.glob("*.mp4"):
        (folder / p.name).symlink_to(p)
    return folder


def test_malformed_metadata_line_names_file_and_line(tmp_path: Path, videos: Path) -> None:
    folder = _folder(tmp_path, videos)
    (folder / "metadata.jsonl").write_text('{"file_name": "video_00000.mp4", "caption": "a"}\n{"file_name": "video_00001.mp4", caption: b}\n')
    with pytest.raises(ValueError, match=r"metadata\.jsonl:2: malformed JSON .*expected one JSON object per line"):
        load_samples(str(folder))
    (folder / "metadata.jsonl").write_text('{"file_name": "video_00000.mp4", "caption": "a"}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"metadata\.jsonl:2: expected a JSON object"):
        load_samples(str(folder))


def test_empty_metadata_says_it_is_empty(tmp_path: Path, videos: Path) -> None:
    folder = _folder(tmp_path, videos)
    (folder / "metadata.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match=r"metadata\.jsonl is empty: expected one row per video"):
        load_samples(str(folder))
    (folder / "metadata.jsonl").unlink()
    (folder / "metadata.csv").write_text("")
    with pytest.raises(ValueError, match=r"metadata\.csv is empty"):
        load_samples(str(folder))


def test_invalid_unicode_in_json_captions(tmp_path: Path, videos: Path) -> None:
    folder = _folder(tmp_path, videos)
    # a lone surrogate spelled as a JSON escape: valid JSON, but no text encoder can take it
    (folder / "metadata.jsonl").write_text('{"file_name": "video_00000.mp4", "caption": "ok"}\n'
                                           '{"file_name": "video_00001.mp4", "caption": "bad \\ud800 text"}\n')
    with pytest.raises(ValueError, match=r"metadata\.jsonl:2: 'caption': invalid unicode \(lone surrogate"):
        load_samples(str(folder))
    # bytes that are not UTF-8 at all
    (folder / "metadata.jsonl").write_bytes(b'{"file_name": "video_00000.mp4", "caption": "ok"}\n'
                                            b'{"file_name": "video_00001.mp4", "caption": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"metadata\.jsonl: line 2: not UTF-8 text \(byte 0xe9"):
        load_samples(str(folder))


def test_txt_caption_encodings(tmp_path: Path, videos: Path) -> None:
    folder = _folder(tmp_path, videos)
    (folder / "video_00000.txt").write_text("un caf\u00e9 anim\u00e9", encoding="utf-16")  # with its BOM: read as text
    (folder / "video_00001.txt").write_bytes("un caf\u00e9".encode("latin-1"))
    with pytest.raises(ValueError, match=r"video_00001\.txt: line 1: not UTF-8 text .*save the file as UTF-8"):
        load_samples(str(folder))
    (folder / "video_00001.txt").write_bytes("no mark".encode("utf-16-le"))  # UTF-16 without its BOM
    with pytest.raises(ValueError, match=r"video_00001\.txt: line 1: NUL characters \(UTF-16 without a byte-order mark\?\)"):
        load_samples(str(folder))
    (folder / "video_00001.txt").write_text("fine")
    captions = {s.key: s.caption for s in load_samples(str(folder))}
    assert captions == {"video_00000.mp4": "un caf\u00e9 anim\u00e9", "video_00001.mp4": "fine"}


def test_mistyped_relative_path_is_never_sent_to_the_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    import datasets

    def no_hub(*args, **kwargs):  # test-side guard: any Hub call fails the test
        raise AssertionError(f"sent to the Hub: {args}")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    for typo in ("data/my_vidoes", "./vids", "../vids", "~/no-such-videos-here", "a/b/c", "vids"):
        start = time.perf_counter()
        with pytest.raises(ValueError, match=r"does not exist \(it names a local path; a Hub dataset id has the form owner/name\)"):
            load_samples(typo)
        assert time.perf_counter() - start < 2.0
    assert looks_local("data/anything") and not looks_local("someone/some-dataset")


def test_pyav_errors_are_readable(tmp_path: Path, videos: Path) -> None:
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all" * 50)
    with pytest.raises(VideoDecodeError) as info:
        probe_video(str(bad))
    text = str(info.value)
    assert "Errno" not in text and "1094995529" not in text
    assert str(bad) in text and "not a video file, or a damaged one" in text
    # the same text reaches the skip report of the dataset scan
    folder = _folder(tmp_path, videos)
    (folder / "broken.mp4").write_bytes(b"junk" * 100)
    rows = [{"file_name": n, "caption": "c"} for n in ("video_00000.mp4", "broken.mp4")]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _, report = build_dataset(DataConfig(path=str(folder), frames=5, height=32, width=32, num_workers=0), 4, 0)
    assert report.skipped["unreadable"] == 1
    assert "Errno" not in report.summary() and "broken.mp4" in report.summary()
