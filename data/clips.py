"""Clip planning: which source frames make a clip, and how a frame is resized and cropped.

The frame arithmetic lives here, in one place, because it is where trainers lose users' videos:
a video VAE that compresses time by ``m`` (4 for Wan/HunyuanVideo, 6 for Mochi) takes ``m*k + 1``
frames, and the clip is measured *after* resampling to the target fps.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Literal, Optional, Union

import numpy as np
import torch

from data.video import FrameTransform, as_fraction, max_resampled_frames, resample_indices

StartMode = Literal["start", "random", "chunks"]
CropMode = Literal["center", "random"]


# -- frame counts of the form m*k + 1 ------------------------------------------------------


def _check_multiple(multiple: int) -> None:
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"frame_multiple must be a positive int, got {multiple!r}")


def is_valid_frame_count(frames: int, multiple: int) -> bool:
    """True when ``frames`` is ``multiple * k + 1`` for some k >= 0."""
    _check_multiple(multiple)
    return isinstance(frames, int) and frames >= 1 and (frames - 1) % multiple == 0


def floor_frame_count(frames: int, multiple: int) -> int:
    """Largest valid count <= ``frames`` (0 when there is none)."""
    _check_multiple(multiple)
    return 0 if frames < 1 else (frames - 1) // multiple * multiple + 1


def nearest_frame_counts(frames: int, multiple: int) -> tuple[int, int]:
    """(largest valid count <= frames, smallest valid count >= frames); equal when ``frames`` is valid."""
    lower = floor_frame_count(frames, multiple)
    if lower == frames:
        return lower, lower
    return (lower if lower >= 1 else 1), (lower + multiple if lower >= 1 else 1)


def latent_frame_count(frames: int, multiple: int) -> int:
    """Frames after the VAE's temporal compression: (frames - 1) / multiple + 1."""
    check_frame_count(frames, multiple)
    return (frames - 1) // multiple + 1


def check_frame_count(frames: int, multiple: int, name: str = "frames") -> None:
    """Raise a ValueError that names the setting and the nearest valid values."""
    if isinstance(frames, bool) or not isinstance(frames, int):
        raise TypeError(f"{name} must be an int, got {type(frames).__name__}")
    if not is_valid_frame_count(frames, multiple):
        lo, hi = nearest_frame_counts(frames, multiple)
        nearest = f"{hi}" if lo == hi or frames < 1 else f"{lo} or {hi}"
        raise ValueError(
            f"{name}={frames} is not of the form {multiple}k+1 that this model family's VAE needs "
            f"(it compresses time by {multiple}); nearest valid values: {nearest}"
        )


# -- temporal planning ---------------------------------------------------------------------


def last_offset(frames: int, src_fps: Union[float, Fraction], fps: Union[float, Fraction]) -> int:
    """Source-frame offset of a clip's last frame from its first one."""
    return resample_indices(frames, src_fps, fps)[-1] if frames > 0 else 0


def available_frames(num_src: int, src_fps: Union[float, Fraction], fps: Union[float, Fraction]) -> int:
    """How many frames at ``fps`` a ``num_src``-frame video at ``src_fps`` yields (from its first frame)."""
    return max_resampled_frames(num_src, src_fps, fps)


def max_start(num_src: int, src_fps: Union[float, Fraction], frames: int, fps: Union[float, Fraction]) -> int:
    """Last source frame a clip may start at; -1 when the video is too short for one clip."""
    return num_src - 1 - last_offset(frames, src_fps, fps)


def clip_starts(
    num_src: int,
    src_fps: Union[float, Fraction],
    frames: int,
    fps: Union[float, Fraction],
    start: StartMode,
    clips_per_video: int = 1,
    rng: Optional[np.random.Generator] = None,
) -> list[int]:
    """First source frame of each clip taken from one video ([] when it is too short).

    start: the beginning; random: ``clips_per_video`` uniform draws (needs ``rng``);
    chunks: ``clips_per_video`` evenly spaced starts from the first to the last possible one
    (fewer when the video has fewer distinct starts).
    """
    if clips_per_video < 1:
        raise ValueError(f"clips_per_video must be >= 1, got {clips_per_video}")
    hi = max_start(num_src, src_fps, frames, fps)
    if hi < 0:
        return []
    if start == "start":
        return [0]
    if start == "random":
        if rng is None:
            raise ValueError("start='random' needs an rng")
        return [int(x) for x in rng.integers(0, hi + 1, size=clips_per_video)]
    if start == "chunks":
        if clips_per_video == 1:
            return [0]
        starts = [round(Fraction(k * hi, clips_per_video - 1)) for k in range(clips_per_video)]
        return sorted(set(int(s) for s in starts))
    raise ValueError(f"start must be 'start', 'random' or 'chunks', got {start!r}")


def clip_indices(start: int, frames: int, src_fps: Union[float, Fraction], fps: Union[float, Fraction]) -> list[int]:
    """Source frame indices of a clip of ``frames`` frames at ``fps`` starting at source frame ``start``."""
    return resample_indices(frames, src_fps, fps, start=start)


# -- spatial planning ----------------------------------------------------------------------


def aspect_change(src_h: int, src_w: int, out_h: int, out_w: int) -> float:
    """Relative aspect-ratio difference, symmetric: max(a, b) / min(a, b) - 1 (0 = same shape)."""
    a, b = src_w / src_h, out_w / out_h
    return max(a, b) / min(a, b) - 1.0


def resize_crop(
    src_h: int, src_w: int, out_h: int, out_w: int, crop: CropMode = "center", rng: Optional[np.random.Generator] = None
) -> FrameTransform:
    """Scale so the frame covers out_h x out_w (the shorter side relative to the target fits exactly),
    then crop the overflow from the centre or at a random offset."""
    if min(src_h, src_w, out_h, out_w) < 1:
        raise ValueError(f"sizes must be positive, got source {src_h}x{src_w}, target {out_h}x{out_w}")
    scale = max(out_h / src_h, out_w / src_w)
    rh, rw = max(out_h, round(src_h * scale)), max(out_w, round(src_w * scale))
    if crop == "center":
        top, left = (rh - out_h) // 2, (rw - out_w) // 2
    elif crop == "random":
        if rng is None:
            raise ValueError("crop='random' needs an rng")
        top, left = int(rng.integers(0, rh - out_h + 1)), int(rng.integers(0, rw - out_w + 1))
    else:
        raise ValueError(f"crop must be 'center' or 'random', got {crop!r}")
    return FrameTransform(rh, rw, top, left, out_h, out_w)


# -- tensors -------------------------------------------------------------------------------


def to_pixels(frames: np.ndarray, dtype: torch.dtype = torch.float32, *, channels_first: bool = False) -> torch.Tensor:
    """uint8 [F, H, W, 3] (or [3, F, H, W] with ``channels_first``) -> [3, F, H, W]; floating dtypes
    are scaled to [-1, 1], uint8 is kept as is (4x less to move between processes; convert on the
    GPU with ``pixels_to_float``)."""
    c_axis = 0 if channels_first else -1
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[c_axis] != 3:
        layout = "[3, F, H, W]" if channels_first else "[F, H, W, 3]"
        raise ValueError(f"frames must be uint8 {layout}, got {frames.dtype} {tuple(frames.shape)}")
    if dtype != torch.uint8 and not dtype.is_floating_point:
        raise ValueError(f"dtype must be uint8 or floating, got {dtype}")
    src = torch.from_numpy(frames)
    if not channels_first:
        src = src.permute(3, 0, 1, 2)
    if dtype == torch.uint8:
        return src.contiguous()
    out = torch.empty(src.shape, dtype=dtype)
    out.copy_(src)  # contiguous when channels_first: one vectorised pass
    return out.div_(127.5).sub_(1.0)


def pixels_to_float(pixels: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 pixels (any layout) -> floating in [-1, 1]; floating input is returned cast, unchanged in range."""
    if pixels.dtype == torch.uint8:
        return pixels.to(dtype).div_(127.5).sub_(1.0)
    return pixels.to(dtype)


__all__ = [
    "as_fraction",
    "aspect_change",
    "available_frames",
    "check_frame_count",
    "clip_indices",
    "clip_starts",
    "floor_frame_count",
    "is_valid_frame_count",
    "last_offset",
    "latent_frame_count",
    "max_start",
    "nearest_frame_counts",
    "pixels_to_float",
    "resize_crop",
    "to_pixels",
]
