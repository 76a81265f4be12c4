"""Tiny real videos for the data tests (PyAV + libx264, a few KB each)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import pytest

from data.synthetic import write_mp4, write_synthetic_dataset
from video_helpers import index_frames, noise_frames


@pytest.fixture
def make_video(tmp_path: Path) -> Callable[..., Path]:
    """make_video(name, frames=12, fps=16, height=32, width=32, content="index"|"noise", **write_mp4 kwargs)."""

    def make(
        name: str,
        frames: int = 12,
        fps: float = 16,
        height: int = 32,
        width: int = 32,
        content: str = "index",
        folder: Optional[Path] = None,
        **kwargs,
    ) -> Path:
        arr = index_frames(frames, height, width) if content == "index" else noise_frames(frames, height, width)
        path = (folder or tmp_path) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_mp4(path, arr, fps, **kwargs)

    return make


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six synthetic 33-frame 32x48 videos at 16 fps with captions (shared, read-only)."""
    return write_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), 6, 33, 32, 48, fps=16, seed=3)
