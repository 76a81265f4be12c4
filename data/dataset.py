"""The clip dataset: scan and probe every video up front, then decode clips lazily in workers.

Up-front scanning (in the main process) is what lets every skipped video be counted by reason and
reported before training starts. A video that passes the scan but fails to decode later, inside a
DataLoader worker, is replaced by another clip of the same bucket and reported in the batch's
``failed`` list (so batch shapes stay fixed and no rank stalls); ``SkipReport.record_failures``
accumulates those for logging. With ``data.on_bad_video: error`` both cases raise instead.
"""

from __future__ import annotations

import hashlib

import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from data.buckets import Bucket, BucketBatchSampler, choose_bucket, parse_buckets
from data.clips import available_frames, clip_indices, clip_starts, resize_crop, to_pixels
from data.config import DataConfig
from data.sources import VideoSample, load_samples
from data.video import VideoDecodeError, VideoInfo, VideoRef, as_fraction, decode_frames, probe_video

logger = logging.getLogger(__name__)

SKIP_REASONS = ("too_short", "unreadable", "aspect", "missing_caption")
RUNTIME_REASON = "decode_error"
_EXAMPLES_PER_REASON = 5


@dataclass
class SkipReport:
    """Counts of what the scan kept and skipped (by reason), plus decode failures seen during training."""

    videos: int = 0
    kept: int = 0
    clips: int = 0
    skipped: dict[str, int] = field(default_factory=lambda: {r: 0 for r in SKIP_REASONS})
    examples: dict[str, list[str]] = field(default_factory=dict)
    clips_per_bucket: dict[str, int] = field(default_factory=dict)
    decode_failures: int = 0
    failed_videos: dict[str, str] = field(default_factory=dict)  # key -> last error

    def add(self, reason: str, key: str, detail: str) -> None:
        if reason not in self.skipped:
            raise ValueError(f"unknown skip reason {reason!r}; expected one of {SKIP_REASONS}")
        self.skipped[reason] += 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < _EXAMPLES_PER_REASON:
            ex.append(f"{key}: {detail}" if detail else key)

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def record_failures(self, failures: Sequence[dict[str, str]]) -> None:
        """Add a batch's ``failed`` list (decode failures inside workers)."""
        for f in failures:
            self.decode_failures += 1
            self.failed_videos[f["key"]] = f["error"]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SkipReport":
        """Inverse of ``dataclasses.asdict`` (the latent cache keeps the report of its scan)."""
        return cls(**{k: (dict(v) if isinstance(v, dict) else v) for k, v in d.items()})

    def as_dict(self, prefix: str = "data/") -> dict[str, int]:
        """Flat numbers for a tracker (wandb)."""
        out = {f"{prefix}videos": self.videos, f"{prefix}videos_kept": self.kept, f"{prefix}clips": self.clips}
        out.update({f"{prefix}skipped_{r}": n for r, n in self.skipped.items()})
        out[f"{prefix}decode_failures"] = self.decode_failures
        out[f"{prefix}videos_failed_decode"] = len(self.failed_videos)
        return out

    def summary(self) -> str:
        lines = [f"data: {self.videos} videos scanned, {self.kept} kept -> {self.clips} clips; {self.total_skipped} skipped"]
        for reason, n in self.skipped.items():
            if n:
                lines.append(f"  skipped {reason}: {n}" + "".join(f"\n    {e}" for e in self.examples.get(reason, [])))
        for bucket, n in self.clips_per_bucket.items():
            lines.append(f"  bucket {bucket}: {n} clips")
        if self.decode_failures:
            lines.append(f"  decode failures during training: {self.decode_failures} ({len(self.failed_videos)} videos)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


@dataclass(frozen=True)
class ClipEntry:
    """One clip to load: the video, its caption, its probed info, bucket, and fixed start (None = random)."""

    key: str
    video: VideoRef
    caption: str
    info: VideoInfo
    bucket: int
    start: Optional[int]
    clip: int = 0


class ClipDataset(Dataset):
    """Decoded clips. Item: dict with

    * ``pixels``: [3, F, H, W] (float in [-1, 1], or uint8 when built with pixel_dtype=torch.uint8);
    * ``caption`` (str), ``key`` (str: the video's name), ``index`` (int: this dataset index, of the
      clip actually returned), ``clip`` (int: clip number within the video);
    * ``bucket`` ((F, H, W)), ``bucket_index`` (int), ``start_frame`` (int: first source frame);
    * ``failed``: list of {"key", "reason", "error"} for clips that failed to decode and were replaced.

    Indices may be plain ints or ``(index, epoch)`` pairs (as BucketBatchSampler yields them); the
    epoch seeds the random start/crop so a clip is reproducible on resume.
    """

    def __init__(
        self,
        entries: Sequence[ClipEntry],
        buckets: Sequence[Bucket],
        fps: float,
        *,
        crop: str = "center",
        seed: int = 0,
        pixel_dtype: torch.dtype = torch.float32,
        on_bad_video: str = "skip",
        max_retries: int = 3,
        decode_threads: int = 0,
    ) -> None:
        self.entries = list(entries)
        self.buckets = [tuple(b) for b in buckets]
        self.fps = as_fraction(fps, "data.fps")
        self.crop = crop
        self.seed = seed
        self.pixel_dtype = pixel_dtype
        self.on_bad_video = on_bad_video
        self.max_retries = max_retries
        self.decode_threads = decode_threads
        self.epoch = 0
        self._by_bucket: dict[int, list[int]] = {}
        self._pos_in_bucket: list[int] = []
        for i, e in enumerate(self.entries):
            peers = self._by_bucket.setdefault(e.bucket, [])
            self._pos_in_bucket.append(len(peers))
            peers.append(i)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def bucket_ids(self) -> list[int]:
        return [e.bucket for e in self.entries]

    @property
    def item_ids(self) -> list[str]:
        """Stable text id of every clip (video, clip number, shape, start, plus a digest of the caption and of the
        probed video) that the latent cache digests, so an edited caption or a replaced video re-encodes its shard."""
        ids = []
        for e in self.entries:
            content = f"{e.caption}\x00{e.info.num_frames}|{e.info.fps}|{e.info.width}x{e.info.height}|{e.info.codec}"
            digest = hashlib.sha1(content.encode("utf-8")).hexdigest()[:12]
            shape = "x".join(map(str, self.buckets[e.bucket]))
            ids.append(f"{e.key}|{e.clip}|{shape}|{'random' if e.start is None else e.start}|{digest}")
        return ids

    def set_epoch(self, epoch: int) -> None:
        """Epoch for plain-int indices (pairs from BucketBatchSampler carry their own)."""
        self.epoch = epoch

    def load(self, index: int, epoch: int) -> dict[str, Any]:
        """Decode one clip; raises VideoDecodeError on a bad file."""
        e = self.entries[index]
        frames, height, width = self.buckets[e.bucket]
        rng = np.random.default_rng([self.seed, epoch, index])
        if e.start is None:
            start = clip_starts(e.info.num_frames, e.info.fps, frames, self.fps, "random", 1, rng)[0]
        else:
            start = e.start
        indices = clip_indices(start, frames, e.info.fps, self.fps)
        tf = resize_crop(e.info.height, e.info.width, height, width, self.crop, rng)  # type: ignore[arg-type]
        arr = decode_frames(e.video, indices, e.info, tf, threads=self.decode_threads, channels_first=True)
        return {
            "pixels": to_pixels(arr, self.pixel_dtype, channels_first=True),
            "caption": e.caption,
            "key": e.key,
            "index": index,
            "clip": e.clip,
            "bucket": (frames, height, width),
            "bucket_index": e.bucket,
            "start_frame": start,
            "failed": [],
        }

    def __getitem__(self, idx: Union[int, tuple[int, int]]) -> dict[str, Any]:
        index, epoch = (idx if isinstance(idx, tuple) else (int(idx), self.epoch))
        failed: list[dict[str, str]] = []
        peers = self._by_bucket[self.entries[index].bucket]
        pos = self._pos_in_bucket[index]
        for attempt in range(min(self.max_retries, len(peers) - 1) + 1):
            j = peers[(pos + attempt) % len(peers)]
            try:
                item = self.load(j, epoch)
            except VideoDecodeError as err:
                if self.on_bad_video == "error":
                    raise RuntimeError(
                        f"{self.entries[j].key}: {RUNTIME_REASON} ({err}); set data.on_bad_video='skip' to skip it"
                    ) from err
                logger.warning("decode failed, using another clip of the same bucket: %s", err)
                failed.append({"key": self.entries[j].key, "reason": RUNTIME_REASON, "error": str(err)})
                continue
            item["failed"] = failed
            return item
        return {"pixels": None, "failed": failed, "bucket": self.buckets[self.entries[index].bucket]}

    @staticmethod
    def collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return collate_clips(items)


def collate_clips(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack same-bucket clips; drops failure markers and reports every failure in ``failed``.

    Returns {"pixels": [B, 3, F, H, W] or None when every item failed, "captions": list[str],
    "keys": list[str], "indices": list[int], "clips": list[int], "bucket_indices": list[int],
    "bucket" and "clip_shape": (F, H, W) or None, "batch_size": B, "failed": list[dict]}.
    """
    failed = [f for it in items for f in it.get("failed", [])]
    good = [it for it in items if it.get("pixels") is not None]
    buckets = {tuple(it["bucket"]) for it in good}
    if len(buckets) > 1:
        raise ValueError(f"a batch mixes clip shapes {sorted(buckets)}; use BucketBatchSampler (or batch_size=1)")
    return {
        "pixels": torch.stack([it["pixels"] for it in good]) if good else None,
        "captions": [it["caption"] for it in good],
        "keys": [it["key"] for it in good],
        "indices": [it["index"] for it in good],
        "clips": [it["clip"] for it in good],
        "bucket_indices": [it["bucket_index"] for it in good],
        "bucket": (shape := buckets.pop() if buckets else None),
        "clip_shape": shape,
        "batch_size": len(good),
        "failed": failed,
    }


# -- building --------------------------------------------------------------------------------


def validate_data_config(cfg: DataConfig, frame_multiple: int) -> list[Bucket]:
    """Check the ``data:`` settings once, up front; returns the buckets (main shape first)."""
    buckets = parse_buckets(cfg.frames, cfg.height, cfg.width, cfg.buckets, frame_multiple)
    as_fraction(cfg.fps, "data.fps")
    choices = {
        "start": ("start", "random", "chunks"),
        "crop": ("center", "random"),
        "on_bad_video": ("skip", "error"),
    }
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"data.{name} must be one of {allowed}, got {getattr(cfg, name)!r}")
    if not isinstance(cfg.clips_per_video, int) or cfg.clips_per_video < 1:
        raise ValueError(f"data.clips_per_video must be an int >= 1, got {cfg.clips_per_video!r}")
    if cfg.clips_per_video > 1 and cfg.start == "start":
        raise ValueError("data.clips_per_video > 1 needs data.start 'chunks' or 'random' (with 'start' every clip is the same)")
    if not cfg.max_aspect_change >= 0:
        raise ValueError(f"data.max_aspect_change must be >= 0 (0 = any aspect), got {cfg.max_aspect_change!r}")
    if not isinstance(cfg.num_workers, int) or cfg.num_workers < 0:
        raise ValueError(f"data.num_workers must be an int >= 0, got {cfg.num_workers!r}")
    return buckets


def _probe(sample: VideoSample) -> Union[VideoInfo, str]:
    if sample.video is None:
        return "the row names no video"
    try:
        info = probe_video(sample.video)
    except VideoDecodeError as err:
        return str(err)
    if info.num_frames < 1:
        return "no frames"
    return info


def build_dataset(
    cfg: DataConfig,
    frame_multiple: int,
    seed: int,
    *,
    pixel_dtype: torch.dtype = torch.float32,
    probe_threads: int = 4,
    samples: Optional[Sequence[VideoSample]] = None,
) -> tuple[ClipDataset, SkipReport]:
    """Scan the source, probe every video, assign buckets and plan clips.

    Every video that yields no clip is counted in the SkipReport by reason; with
    ``cfg.on_bad_video == "error"`` the first such video raises a ValueError naming it and the reason.
    ``samples`` overrides the source listing (tests, custom sources).
    """
    buckets = validate_data_config(cfg, frame_multiple)
    if samples is None:
        samples = load_samples(
            cfg.path,
            split=cfg.split,
            streaming=cfg.streaming,
            video_column=cfg.video_column,
            caption_column=cfg.caption_column,
        )
    report = SkipReport(videos=len(samples))
    fps = as_fraction(cfg.fps, "data.fps")
    to_probe = [s for s in samples if s.caption is not None]
    with ThreadPoolExecutor(max_workers=max(1, probe_threads)) as pool:
        probed = dict(zip((id(s) for s in to_probe), pool.map(_probe, to_probe)))

    def skip(sample: VideoSample, reason: str, detail: str) -> None:
        if cfg.on_bad_video == "error":
            raise ValueError(f"{sample.key}: {reason} ({detail}); set data.on_bad_video='skip' to skip such videos")
        report.add(reason, sample.key, detail)

    entries: list[ClipEntry] = []
    per_bucket: Counter[int] = Counter()
    for sample in samples:
        if sample.caption is None:
            skip(sample, "missing_caption", "no caption")
            continue
        info = probed[id(sample)]
        if isinstance(info, str):
            skip(sample, "unreadable", info)
            continue
        avail = available_frames(info.num_frames, info.fps, fps)
        choice = choose_bucket(buckets, avail, info.height, info.width, cfg.max_aspect_change)
        if choice.index is None:
            detail = choice.detail
            if choice.reason == "too_short":
                detail += f" ({info.num_frames} frames at {float(info.fps):g} fps, resampled to {float(fps):g} fps)"
            skip(sample, choice.reason or "too_short", detail)
            continue
        frames = buckets[choice.index][0]
        if cfg.start == "random":
            starts: list[Optional[int]] = [None] * cfg.clips_per_video
        else:
            starts = list(clip_starts(info.num_frames, info.fps, frames, fps, cfg.start, cfg.clips_per_video))
        for k, start in enumerate(starts):
            entries.append(ClipEntry(sample.key, sample.video, sample.caption, info, choice.index, start, k))  # type: ignore[arg-type]
        per_bucket[choice.index] += len(starts)
        report.kept += 1
    report.clips = len(entries)
    report.clips_per_bucket = {"x".join(map(str, buckets[i])): per_bucket[i] for i in sorted(per_bucket)}
    (logger.warning if report.total_skipped else logger.info)("%s", report.summary())
    dataset = ClipDataset(
        entries,
        buckets,
        cfg.fps,
        crop=cfg.crop,
        seed=seed,
        pixel_dtype=pixel_dtype,
        on_bad_video=cfg.on_bad_video,
    )
    return dataset, report


def make_dataloader(
    dataset: Any,
    cfg: Optional[DataConfig] = None,
    *,
    batch_size: int,
    seed: int = 0,
    epoch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    skip_batches: int = 0,
    num_workers: Optional[int] = None,
    shuffle: Optional[bool] = None,
    drop_last: bool = False,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader over a ClipDataset or LatentCacheDataset for one epoch: same-bucket batches, this
    rank's share of them (every rank gets the same number), the first ``skip_batches`` skipped (resume).

    ``num_workers`` / ``shuffle`` default to ``cfg.num_workers`` / ``cfg.shuffle`` (else 0 / True).
    Don't pass the loader through ``accelerator.prepare``: it is sharded already.
    """
    sampler = BucketBatchSampler(
        dataset.bucket_ids,
        batch_size,
        seed=seed,
        shuffle=shuffle if shuffle is not None else (cfg.shuffle if cfg is not None else True),
        drop_last=drop_last,
        num_replicas=world_size,
        rank=rank,
    )
    sampler.set_epoch(epoch, skip_batches)
    workers = num_workers if num_workers is not None else (cfg.num_workers if cfg is not None else 0)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=dataset.collate,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=False,
    )
