"""Typed settings of the data pipeline (the ``data:`` section of a recipe).

Kept in ``data`` so that the data package stays independent of ``train``;
``train.config`` embeds this class in the recipe schema.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional


@dataclass
class SyntheticDataConfig:
    """When set and ``data.path`` holds no videos yet, the trainer writes this synthetic set there first."""

    num_videos: int = 8
    frames: int = 33
    height: int = 64
    width: int = 64
    fps: float = 16.0
    seed: int = 0


@dataclass
class DataConfig:
    # Where the videos are: a local folder (metadata.jsonl/.csv/.json or a .txt caption beside each video)
    # or a Hugging Face Hub dataset id.
    path: str = ""
    split: str = "train"
    streaming: bool = False
    video_column: Optional[str] = None  # default: "file_name", then "video", then "path"
    caption_column: Optional[str] = None  # default: "caption", then "text", then "prompt"
    # Target clip: frames at `fps` (videos are resampled to this rate), resized and cropped to height x width.
    frames: int = 81
    fps: float = 16.0
    height: int = 480
    width: int = 832
    # Extra (frames, height, width) buckets; each video goes to the largest bucket it fits. Empty: one bucket.
    buckets: list[list[int]] = field(default_factory=list)
    start: Literal["start", "random", "chunks"] = "start"
    clips_per_video: int = 1  # used with start="chunks": evenly spaced clips per video
    crop: Literal["center", "random"] = "center"
    max_aspect_change: float = 0.0  # 0 = any aspect accepted (crop); >0 = skip videos whose aspect differs more
    on_bad_video: Literal["skip", "error"] = "skip"
    num_workers: int = 2
    shuffle: bool = True
    # Precomputed latents + text embeddings (see train/precompute.py). None: encode on the fly.
    cache_dir: Optional[str] = None
    synthetic: Optional[SyntheticDataConfig] = None
