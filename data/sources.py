"""Where the (video, caption) pairs come from, read through Hugging Face ``datasets``.

Accepted ``data.path``:
  * a local folder with ``metadata.jsonl`` / ``metadata.csv`` / ``metadata.json`` (a ``file_name`` or
    ``video`` column relative to the folder, and a ``caption`` column);
  * a local folder of videos with a same-name ``.txt`` caption beside each video;
  * a folder written by ``Dataset.save_to_disk`` or holding parquet/arrow files, or a Hub dataset id,
    with a video column (``datasets.Video`` or a file name) and a caption column; streaming allowed.

Video columns are always cast to ``Video(decode=False)``: ``datasets`` would otherwise decode with
torchcodec, which is often missing or cannot find its FFmpeg. Decoding is done by data/video.py.
Rows are never dropped here: a row without a caption or video comes back with None so that the
dataset builder can count it.
"""

from __future__ import annotations

import logging

import io
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Optional

import datasets

from data.hub_ids import looks_local
from data.video import VideoRef

VIDEO_EXTENSIONS = (".mp4", ".mov", ".webm", ".mkv", ".avi", ".m4v", ".gif")
METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.json")
DEFAULT_VIDEO_COLUMNS = ("file_name", "video", "path")
DEFAULT_CAPTION_COLUMNS = ("caption", "text", "prompt")

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class VideoSample:
    """One row: a display key for reports, where the video is, and its caption (None: missing)."""

    key: str
    video: Optional[VideoRef]
    caption: Optional[str]


class ArrowVideo:
    """Video bytes stored in a (memory-mapped) Arrow table; read lazily so the list stays small."""

    def __init__(self, table: datasets.Dataset, row: int, column: str, name: str) -> None:
        self.table, self.row, self.column, self.name = table, row, column, name

    def open(self) -> BinaryIO:
        return io.BytesIO(self.table[self.row][self.column]["bytes"])

    def __repr__(self) -> str:
        return f"ArrowVideo({self.name!r})"


def _clean_caption(value: Any) -> Optional[str]:
    if isinstance(value, (list, tuple)):  # several captions: the first non-empty one
        value = next((v for v in value if isinstance(v, str) and v.strip()), None)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if not isinstance(value, str):
        raise TypeError(f"caption values must be strings, got {type(value).__name__}: {value!r}")
    value = value.replace("\ufeff", "").strip()  # a byte-order mark from Windows editors is not text
    return value or None


def _pick_column(columns: Iterable[str], explicit: Optional[str], defaults: tuple[str, ...], setting: str, where: str) -> str:
    columns = list(columns)
    if explicit is not None:
        if explicit not in columns:
            raise ValueError(f"{setting}={explicit!r} is not a column of {where}; columns: {columns}")
        return explicit
    for name in defaults:
        if name in columns:
            return name
    raise ValueError(f"{where} has none of the columns {list(defaults)}; set {setting}. Columns: {columns}")


def load_samples(
    path: str,
    *,
    split: str = "train",
    streaming: bool = False,
    video_column: Optional[str] = None,
    caption_column: Optional[str] = None,
    cache_dir: Optional[str] = None,
) -> list[VideoSample]:
    """Every (video, caption) row of the source, in a stable order."""
    if not path:
        raise ValueError("data.path is empty: set it to a local folder or a Hugging Face Hub dataset id")
    folder = Path(path).expanduser()
    if folder.is_dir():
        for name in METADATA_FILES:
            if (folder / name).is_file():
                return _from_metadata(folder, folder / name, video_column, caption_column)
        if (folder / "dataset_info.json").is_file() or (folder / "dataset_dict.json").is_file():
            ds = datasets.load_from_disk(str(folder))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise ValueError(f"data.split={split!r} is not in {folder}; splits: {list(ds)}")
                ds = ds[split]
            return _from_table(ds, str(folder), folder, None, video_column, caption_column, streaming, cache_dir)
        videos = sorted(p for p in folder.rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file())
        if videos:
            return _from_caption_files(folder, videos)
        if any(folder.rglob("*.parquet")) or any(folder.rglob("*.arrow")):
            return _from_hub(str(folder), folder, None, split, streaming, video_column, caption_column, cache_dir)
        raise ValueError(
            f"data.path={path!r} is a folder without {' / '.join(METADATA_FILES)}, videos "
            f"({', '.join(VIDEO_EXTENSIONS)}) with .txt captions, or a saved/parquet dataset"
        )
    if folder.exists():
        raise ValueError(f"data.path={path!r} must be a folder or a Hub dataset id, not a file")
    if looks_local(path):
        raise ValueError(
            f"data.path={path!r} does not exist (it names a local path; a Hub dataset id has the form owner/name)"
        )
    return _from_hub(path, None, path, split, streaming, video_column, caption_column, cache_dir)


def _from_metadata(folder: Path, meta: Path, video_column: Optional[str], caption_column: Optional[str]) -> list[VideoSample]:
    rows = read_metadata_rows(meta)
    vcol = _pick_column(rows[0][1].keys(), video_column, DEFAULT_VIDEO_COLUMNS, "data.video_column", str(meta))
    ccol = _pick_column(rows[0][1].keys(), caption_column, DEFAULT_CAPTION_COLUMNS, "data.caption_column", str(meta))
    samples = []
    for i, (where, row) in enumerate(rows):
        name = row.get(vcol)
        if isinstance(name, dict):  # a Video-typed column
            name = name.get("path")
        if name is not None and not isinstance(name, str):
            raise ValueError(f"{where}: {vcol!r} must be a file name (string), got {name!r}")
        key = str(name) if name else f"{meta.name}[{i}]"
        video = str(folder / name) if name else None
        try:
            caption = _clean_caption(row.get(ccol))
        except TypeError as err:
            raise ValueError(f"{where}: {ccol!r}: {err}") from None
        samples.append(VideoSample(key, video, caption))
    return samples


def read_metadata_rows(meta: Path) -> list[tuple[str, dict[str, Any]]]:
    """The rows of a metadata file, each with its ``file:line`` for error messages.

    Read here rather than through ``datasets``: a bad line must give one message naming the file and the line,
    not an Arrow traceback, and an empty file must say that it is empty.
    """
    try:
        text = _decode_text(meta.read_bytes(), meta)
    except OSError as err:
        raise ValueError(f"{meta}: cannot read ({err.strerror or err})") from None
    if meta.suffix == ".csv":
        rows = _csv_rows(text, meta)
    elif meta.suffix == ".json" and text.lstrip()[:1] in ("[", "{") and not _is_jsonl(text):
        rows = _json_rows(text, meta)
    else:
        rows = _jsonl_rows(text, meta)
    if not rows:
        raise ValueError(f"{meta} is empty: expected one row per video with a file name and a caption column")
    for where, row in rows:
        for key, value in row.items():
            _check_unicode(value, f"{where}: {key!r}")
    return rows


def _decode_text(data: bytes, path: Path) -> str:
    """UTF-8 (with or without a byte-order mark) or UTF-16 with its byte-order mark; anything else is named."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}: not valid UTF-16 text (at byte {err.start})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ValueError(
            f"{path}: line {line}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}); "
            "save the file as UTF-8"
        ) from None
    if "\x00" in text:
        line = text[: text.index("\x00")].count("\n") + 1
        raise ValueError(f"{path}: line {line}: NUL characters (UTF-16 without a byte-order mark?); save the file as UTF-8")
    return text


def _check_unicode(value: Any, where: str) -> None:
    """JSON escapes can spell lone surrogates (\\ud800) that no tokenizer or file system can encode."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            raise ValueError(f"{where}: invalid unicode (lone surrogate {value[err.start]!r} at character {err.start})") from None
    elif isinstance(value, (list, tuple)):
        for v in value:
            _check_unicode(v, where)


def _is_jsonl(text: str) -> bool:
    lines = [line for line in text.splitlines() if line.strip()]
    return len(lines) > 1 and all(line.lstrip().startswith("{") and line.rstrip().endswith("}") for line in lines)


def _jsonl_rows(text: str, meta: Path) -> list[tuple[str, dict[str, Any]]]:
    import json

    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{meta}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: malformed JSON ({err.msg} at column {err.colno}); expected one JSON object per line") from None
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object like {{\"file_name\": ..., \"caption\": ...}}, got {type(row).__name__}")
        rows.append((where, row))
    return rows


def _json_rows(text: str, meta: Path) -> list[tuple[str, dict[str, Any]]]:
    import json

    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{meta}:{err.lineno}: malformed JSON ({err.msg} at column {err.colno})") from None
    if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):  # columns -> rows
        lengths = {len(v) for v in data.values()}
        if len(lengths) != 1:
            raise ValueError(f"{meta}: the columns have different lengths {sorted(lengths)}")
        data = [dict(zip(data, values)) for values in zip(*data.values())]
    elif isinstance(data, dict):  # a single row
        data = [data]
    if not isinstance(data, list):
        raise ValueError(f"{meta}: expected a JSON list of objects (or one object per line), got {type(data).__name__}")
    rows = []
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise ValueError(f"{meta}: item {i}: expected a JSON object, got {type(row).__name__}")
        rows.append((f"{meta}[{i}]", row))
    return rows


def _csv_rows(text: str, meta: Path) -> list[tuple[str, dict[str, Any]]]:
    import csv

    reader = csv.reader(io.StringIO(text))
    try:
        header = next(reader, None)
        if header is None:
            return []
        rows = []
        for record in reader:
            if not any(cell.strip() for cell in record):
                continue
            where = f"{meta}:{reader.line_num}"
            if len(record) > len(header):
                raise ValueError(f"{where}: {len(record)} fields but the header names {len(header)}")
            rows.append((where, {k: (v if v != "" else None) for k, v in zip(header, record)}))
        return rows
    except csv.Error as err:
        raise ValueError(f"{meta}:{reader.line_num}: malformed CSV ({err})") from None


def read_caption_file(path: Path) -> Optional[str]:
    """A ``.txt`` caption: UTF-8 (BOM allowed) or UTF-16 with a BOM; other encodings are refused by name."""
    text = _decode_text(path.read_bytes(), path)
    _check_unicode(text, str(path))
    return _clean_caption(text)


def _from_caption_files(folder: Path, videos: list[Path]) -> list[VideoSample]:
    samples = []
    for video in videos:
        txt = video.with_suffix(".txt")
        caption = read_caption_file(txt) if txt.is_file() else None
        samples.append(VideoSample(str(video.relative_to(folder)), str(video), caption))
    return samples


def _from_hub(
    path: str,
    local: Optional[Path],
    repo_id: Optional[str],
    split: str,
    streaming: bool,
    video_column: Optional[str],
    caption_column: Optional[str],
    cache_dir: Optional[str],
) -> list[VideoSample]:
    try:
        ds = datasets.load_dataset(path, split=split, streaming=streaming, cache_dir=cache_dir)
    except ValueError as err:
        raise ValueError(f"cannot load data.path={path!r} split={split!r}: {err}") from err
    return _from_table(ds, path, local, repo_id, video_column, caption_column, streaming, cache_dir)


def _from_table(
    ds: Any,
    where: str,
    local: Optional[Path],
    repo_id: Optional[str],
    video_column: Optional[str],
    caption_column: Optional[str],
    streaming: bool,
    cache_dir: Optional[str],
) -> list[VideoSample]:
    columns = list(ds.features) if ds.features is not None else None
    if columns is None:  # streaming without declared features: look at the first row
        first = next(iter(ds), None)
        columns = list(first) if first else []
    vcol = _pick_column(columns, video_column, DEFAULT_VIDEO_COLUMNS, "data.video_column", where)
    ccol = _pick_column(columns, caption_column, DEFAULT_CAPTION_COLUMNS, "data.caption_column", where)
    is_video_feature = ds.features is not None and isinstance(ds.features.get(vcol), datasets.Video)
    if is_video_feature:
        ds = ds.cast_column(vcol, datasets.Video(decode=False))
    if isinstance(ds, datasets.IterableDataset):
        return _materialise_stream(ds, where, local, repo_id, vcol, ccol, cache_dir)
    videos_only = ds.select_columns([vcol])
    samples = []
    for i, caption in enumerate(ds[ccol]):
        value = videos_only[i][vcol]
        key, ref = _video_ref(value, i, where, local, repo_id, table=videos_only, column=vcol)
        samples.append(VideoSample(key, ref, _clean_caption(caption)))
    return samples


def _video_ref(
    value: Any,
    row: int,
    where: str,
    local: Optional[Path],
    repo_id: Optional[str],
    table: Optional[datasets.Dataset] = None,
    column: str = "",
) -> tuple[str, Optional[VideoRef]]:
    if isinstance(value, dict):  # datasets.Video(decode=False): {"path", "bytes"}
        name = value.get("path") or f"{where}[{row}]"
        if value.get("bytes") is not None and table is not None:
            return name, ArrowVideo(table, row, column, name)
        value = value.get("path")
    if not value:
        return f"{where}[{row}]", None
    if not isinstance(value, str):
        raise TypeError(f"video column values of {where} must be file names or datasets.Video, got {type(value).__name__}")
    if os.path.isabs(value) or local is None and repo_id is None:
        return value, value
    if local is not None:
        return value, str(local / value)
    from huggingface_hub import hf_hub_download  # only for Hub ids with file-name columns

    try:
        return value, hf_hub_download(repo_id, value, repo_type="dataset")
    except Exception as err:  # noqa: BLE001 - a missing/unreachable file is one unreadable video, not a crash
        logger.warning("cannot download %s from dataset %s: %s", value, repo_id, err)
        return value, f"hf://datasets/{repo_id}/{value} (download failed: {type(err).__name__})"


def _materialise_stream(
    ds: datasets.IterableDataset,
    where: str,
    local: Optional[Path],
    repo_id: Optional[str],
    vcol: str,
    ccol: str,
    cache_dir: Optional[str],
) -> list[VideoSample]:
    """Streamed rows carry their video bytes once: write them to local files (temp + rename, reused
    on the next run) so that probing, workers and later epochs read files."""
    root = Path(cache_dir or datasets.config.HF_DATASETS_CACHE) / "streamed_videos" / re.sub(r"[^\w.-]+", "_", where)
    samples = []
    for i, row in enumerate(ds):
        value = row.get(vcol)
        if isinstance(value, dict) and value.get("bytes") is not None:
            name = value.get("path") or f"{i}.mp4"
            target = root / f"{i:08d}{Path(name).suffix or '.mp4'}"
            if not target.is_file() or target.stat().st_size != len(value["bytes"]):
                root.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
                tmp.write_bytes(value["bytes"])
                os.replace(tmp, target)
            samples.append(VideoSample(name, str(target), _clean_caption(row.get(ccol))))
        else:
            key, ref = _video_ref(value, i, where, local, repo_id)
            samples.append(VideoSample(key, ref, _clean_caption(row.get(ccol))))
    return samples
