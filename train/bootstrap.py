"""Inputs a recipe may ask the trainer to create: a tiny random-weight model and a synthetic video set.

Only the quickstart and smoke tests use this; real recipes point at Hub ids and real data.
"""

from __future__ import annotations

from pathlib import Path

from train.config_schema import RecipeConfig
from train.models import get_adapter

_VIDEO_SUFFIXES = {".mp4", ".mov", ".mkv", ".webm", ".avi"}


def has_videos(folder: Path) -> bool:
    return folder.is_dir() and any(p.suffix.lower() in _VIDEO_SUFFIXES for p in folder.rglob("*"))


def create_missing_inputs(cfg: RecipeConfig) -> list[str]:
    """Create what the recipe asks for and is not there yet; returns a line per thing created."""
    created = []
    model_dir = Path(cfg.model.pretrained)
    if cfg.model.create_tiny_random and not (model_dir / "model_index.json").is_file():
        get_adapter(cfg.model.family).save_tiny_random(str(model_dir), seed=cfg.train.seed)
        created.append(f"tiny random {cfg.model.family} pipeline -> {model_dir}")
    syn = cfg.data.synthetic
    data_dir = Path(cfg.data.path)
    if syn is not None and not has_videos(data_dir):
        from data.synthetic import write_synthetic_dataset

        write_synthetic_dataset(data_dir, syn.num_videos, syn.frames, syn.height, syn.width, syn.fps, syn.seed)
        created.append(f"{syn.num_videos} synthetic videos ({syn.frames} frames, {syn.height}x{syn.width}) -> {data_dir}")
    return created
