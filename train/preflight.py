"""Checks of a whole recipe that need the model family (clip shapes the VAE accepts) or other packages
(export formats): run before the trainer writes, overwrites or deletes anything in the run folder, so that a
late error (e.g. ``validation.frames=32`` at the first validation) can no longer cost an earlier run."""

from __future__ import annotations

from typing import Any

from train.config import ConfigError
from train.config_schema import RecipeConfig


def _shape(adapter: Any, keys: str, frames: int, height: int, width: int) -> None:
    try:
        adapter.geometry(frames, height, width)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{keys} = {frames}x{height}x{width}: {err}") from None


def check_paths(cfg: RecipeConfig) -> None:
    """A local-looking ``model.pretrained`` / ``data.path`` that does not exist is a typo, not a Hub id: say so now
    (the Hub client would retry for half a minute and then raise a ConnectionError)."""
    from pathlib import Path

    from data.hub_ids import looks_local

    cached = bool(cfg.data.cache_dir) and (Path(cfg.data.cache_dir) / "manifest.json").is_file()
    for key, value, not_needed in (
        ("model.pretrained", cfg.model.pretrained, cfg.model.create_tiny_random),
        ("data.path", cfg.data.path, cfg.data.synthetic is not None or cached),  # a cache is read instead
    ):
        if not not_needed and looks_local(value) and not Path(value).expanduser().exists():
            raise ConfigError(f"{key}={value!r} does not exist (it names a local path; a Hub id has the form owner/name)")


def check_recipe(cfg: RecipeConfig, adapter: Any) -> None:
    """Raise ConfigError naming the key for anything the run would trip over later."""
    from data.dataset import validate_data_config

    try:
        buckets = validate_data_config(cfg.data, adapter.frame_multiple)
    except (ValueError, TypeError) as err:
        raise ConfigError(str(err)) from None
    for i, (frames, height, width) in enumerate(buckets):
        _shape(adapter, "data.frames/height/width" if i == 0 else f"data.buckets[{i - 1}]", frames, height, width)
    v, d = cfg.validation, cfg.data
    if v.every_steps and v.prompts:
        _shape(adapter, "validation.frames/height/width", v.frames or d.frames, v.height or d.height, v.width or d.width)
    if cfg.export.at_end:
        from train.exporting import parse_lora_formats

        try:
            parse_lora_formats(list(cfg.export.lora_formats))
        except ValueError as err:
            raise ConfigError(f"export.lora_formats: {str(err).split(': ', 1)[-1]}") from None
