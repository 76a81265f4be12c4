"""Writing a tiny random-weight pipeline folder: a family's builder run under a fixed torch seed, then
``save_pretrained`` into a temporary sibling renamed into place (the folder is complete or absent)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

__all__ = ["save_tiny_pipeline", "write_pipeline_atomically"]


def save_tiny_pipeline(build: Callable[[], Any], out_dir: str | os.PathLike, seed: int = 0) -> str:
    """``build()`` (a family's ``tiny_pipeline``) under ``torch.manual_seed(seed)`` without touching the caller's
    RNG state, written to ``out_dir``; returns the folder. The same seed gives the same files."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__} {seed!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe = build()
    return write_pipeline_atomically(pipe, out_dir)


def write_pipeline_atomically(pipe: Any, out_dir: str | os.PathLike) -> str:
    """save_pretrained into a temporary sibling folder, then rename it to ``out_dir`` (nothing half-written)."""
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"save_tiny_random: {str(out)!r} exists and is not an empty folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(out)
