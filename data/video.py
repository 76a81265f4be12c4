"""Video probing and decoding with PyAV, plus fps resampling by nearest timestamp.

PyAV bundles its own FFmpeg, so this works on every platform without system libraries (torchcodec
needs a matching system FFmpeg and breaks `datasets` when it cannot load it; we never import it).

Frame counts come from the container index (exact for mp4/mov) or, when the container has none
(webm/mkv), from counting packets without decoding: trainers that *estimate* the count from the
duration lose videos to off-by-one "too short" decisions.

Resampling maps output frame j (time j/dst_fps after the clip start) to the source frame whose
timestamp is nearest, with exact rational arithmetic so that e.g. 30 -> 16 fps never drifts.
"""

from __future__ import annotations

import io
import math
import os
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import BinaryIO, Optional, Protocol, Sequence, Union, runtime_checkable

import av
import numpy as np


@runtime_checkable
class OpenableVideo(Protocol):
    """A video that is not a local file (e.g. bytes inside an Arrow table)."""

    name: str

    def open(self) -> BinaryIO: ...


VideoRef = Union[str, "os.PathLike[str]", OpenableVideo]


class VideoDecodeError(RuntimeError):
    """The file could not be opened or decoded, or held fewer frames than its index promised."""


def ref_name(ref: VideoRef) -> str:
    if isinstance(ref, (str, os.PathLike)):  # first: pathlib.Path also has .name and .open()
        return os.fspath(ref)
    return getattr(ref, "name", "<video>")


def av_message(err: BaseException) -> str:
    """PyAV/OS errors without FFmpeg's numeric code ("[Errno 1094995529] Invalid data ..." -> "invalid data ...")."""
    text = getattr(err, "strerror", None) or str(err)
    text = re.sub(r"^\[Errno -?\d+\]\s*", "", str(text)).strip()
    if "invalid data found" in text.lower():
        text += " (not a video file, or a damaged one)"
    return text[:1].lower() + text[1:] if text else type(err).__name__


def _open(ref: VideoRef) -> "av.container.InputContainer":
    try:
        if isinstance(ref, (str, os.PathLike)):
            return av.open(os.fspath(ref), "r")
        if isinstance(ref, (bytes, bytearray)):
            return av.open(io.BytesIO(ref), "r")
        return av.open(ref.open(), "r")
    except (av.FFmpegError, OSError, ValueError) as err:
        raise VideoDecodeError(f"cannot open {ref_name(ref)}: {av_message(err)}") from err


def as_fraction(fps: Union[float, int, Fraction], name: str = "fps") -> Fraction:
    """Exact rate; floats like 29.97 become 2997/100 and 30000/1001 stays exact."""
    if isinstance(fps, bool) or not isinstance(fps, (int, float, Fraction)):
        raise TypeError(f"{name} must be a number, got {type(fps).__name__}")
    rate = fps if isinstance(fps, Fraction) else Fraction(fps).limit_denominator(1001)
    if rate <= 0 or not math.isfinite(float(rate)):
        raise ValueError(f"{name} must be a positive finite number, got {fps!r}")
    return rate


@dataclass(frozen=True)
class VideoInfo:
    """What the planner needs to know about a video (sizes in display orientation)."""

    num_frames: int
    fps: Fraction
    width: int
    height: int
    start_time: float = 0.0  # presentation time of the first frame, seconds
    rotation: int = 0  # counterclockwise degrees to apply for display (multiple of 90)
    codec: str = ""

    @property
    def duration(self) -> float:
        return float(self.num_frames / self.fps)

    @property
    def aspect(self) -> float:
        return self.width / self.height


def _rotation_of(frame: "av.VideoFrame") -> int:
    rot = int(round(getattr(frame, "rotation", 0) or 0))
    return (round(rot / 90) * 90) % 360


def probe_video(ref: VideoRef) -> VideoInfo:
    """Frame count, fps, display size, start time; decodes the first frame to prove the file decodes."""
    try:
        return _probe(ref)
    except av.FFmpegError as err:
        raise VideoDecodeError(f"{ref_name(ref)}: {av_message(err)}") from err


def _probe(ref: VideoRef) -> VideoInfo:
    with _open(ref) as container:
        if not container.streams.video:
            raise VideoDecodeError(f"{ref_name(ref)}: no video stream")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        if not rate or rate <= 0:
            raise VideoDecodeError(f"{ref_name(ref)}: no frame rate in the container")
        try:
            first = next(container.decode(stream), None)
        except av.FFmpegError as err:
            raise VideoDecodeError(f"{ref_name(ref)}: first frame does not decode: {av_message(err)}") from err
        if first is None:
            raise VideoDecodeError(f"{ref_name(ref)}: no decodable frame")
        n = int(stream.frames or 0)
        if n <= 0:  # no index (webm/mkv): count packets, no decoding
            container.seek(0)
            n = sum(1 for p in container.demux(stream) if p.size)
        rotation = _rotation_of(first)
        w, h = first.width, first.height
        if rotation in (90, 270):
            w, h = h, w
        return VideoInfo(
            num_frames=n,
            fps=Fraction(rate),
            width=w,
            height=h,
            start_time=float(first.time or 0.0),
            rotation=rotation,
            codec=stream.codec_context.name,
        )


# -- fps resampling --------------------------------------------------------------------------


def _round_half_down(x: Fraction) -> int:
    return math.ceil(x - Fraction(1, 2))


def resample_indices(
    num_out: int, src_fps: Union[float, Fraction], dst_fps: Union[float, Fraction], start: int = 0
) -> list[int]:
    """Source frame index for each of ``num_out`` output frames at ``dst_fps``, starting at source frame ``start``.

    Output frame j sits at time j/dst_fps after the start; it takes the source frame with the nearest
    timestamp (ties go to the earlier frame, the one still on screen). Down-sampling skips frames,
    up-sampling repeats them.
    """
    src, dst = as_fraction(src_fps, "src_fps"), as_fraction(dst_fps, "dst_fps")
    if num_out < 0 or start < 0:
        raise ValueError(f"num_out and start must be >= 0, got {num_out}, {start}")
    ratio = src / dst
    return [start + _round_half_down(j * ratio) for j in range(num_out)]


def max_resampled_frames(num_src: int, src_fps: Union[float, Fraction], dst_fps: Union[float, Fraction]) -> int:
    """Largest output length whose last nearest-source index stays inside a ``num_src``-frame video."""
    src, dst = as_fraction(src_fps, "src_fps"), as_fraction(dst_fps, "dst_fps")
    if num_src <= 0:
        return 0
    # last index ceil((F-1)*r - 1/2) <= num_src - 1  <=>  (F-1) * r <= num_src - 1/2
    return math.floor((num_src - Fraction(1, 2)) * dst / src) + 1


# -- decoding -------------------------------------------------------------------------------


@dataclass(frozen=True)
class FrameTransform:
    """Resize to (resize_h, resize_w) in display orientation, then crop (top, left, height, width)."""

    resize_h: int
    resize_w: int
    top: int
    left: int
    height: int
    width: int

    def __post_init__(self) -> None:
        if self.top < 0 or self.left < 0 or self.top + self.height > self.resize_h or self.left + self.width > self.resize_w:
            raise ValueError(f"crop {self} falls outside the resized frame")


def _convert(frame: "av.VideoFrame", rotation: int, tf: Optional[FrameTransform], upscale: bool) -> np.ndarray:
    if tf is None:
        arr = frame.to_ndarray(format="rgb24")
        return np.ascontiguousarray(np.rot90(arr, rotation // 90)) if rotation else arr
    # swscale works on the stored (unrotated) frame, so swap the target size for +-90 degrees
    w, h = (tf.resize_h, tf.resize_w) if rotation in (90, 270) else (tf.resize_w, tf.resize_h)
    interp = "BICUBIC" if upscale else "AREA"
    if (w, h) == (frame.width, frame.height):
        arr = frame.to_ndarray(format="rgb24")
    else:
        arr = frame.reformat(width=w, height=h, format="rgb24", interpolation=interp).to_ndarray()
    if rotation:
        arr = np.rot90(arr, rotation // 90)
    return arr[tf.top : tf.top + tf.height, tf.left : tf.left + tf.width]


def decode_frames(
    ref: VideoRef,
    indices: Sequence[int],
    info: VideoInfo,
    transform: Optional[FrameTransform] = None,
    *,
    threads: int = 0,
    channels_first: bool = False,
) -> np.ndarray:
    """Frames at the given source indices (non-decreasing, repeats allowed) as uint8 [N, H, W, 3] RGB,
    or [3, N, H, W] with ``channels_first`` (written frame by frame while hot in cache: no later
    full-clip permute, which costs more than decoding for long 480p clips).

    Seeks to the keyframe before the first needed frame, decodes forward and stops after the last one;
    only the selected frames are converted to RGB. Each index stands for the timestamp
    ``start_time + index / fps``; the frame nearest to it is taken, so variable-frame-rate files
    still get the right content. Raises VideoDecodeError when frames are missing (truncated file).
    """
    if len(indices) == 0:
        raise ValueError("indices must not be empty")
    if any(b < a for a, b in zip(indices, indices[1:])) or indices[0] < 0:
        raise ValueError("indices must be non-negative and non-decreasing")
    targets = [info.start_time + float(i / info.fps) for i in indices]
    half_period = float(1 / (2 * info.fps))
    upscale = transform is not None and transform.resize_h * transform.resize_w > info.height * info.width
    seek = targets[0] - info.start_time > 2 * half_period
    result = _decode_at(ref, targets, indices, info, transform, upscale, threads, seek, channels_first)
    if result is None:  # the seek landed after the first needed frame: decode from the start
        result = _decode_at(ref, targets, indices, info, transform, upscale, threads, False, channels_first)
    assert result is not None
    return result


def _decode_at(
    ref: VideoRef,
    targets: list[float],
    indices: Sequence[int],
    info: VideoInfo,
    transform: Optional[FrameTransform],
    upscale: bool,
    threads: int,
    seek: bool,
    channels_first: bool,
) -> Optional[np.ndarray]:
    half_period = float(1 / (2 * info.fps))
    out: Optional[np.ndarray] = None
    k = 0
    prev: Optional[tuple[float, "av.VideoFrame"]] = None
    converted: tuple[Optional["av.VideoFrame"], Optional[np.ndarray]] = (None, None)

    def take(frame: "av.VideoFrame") -> None:
        nonlocal out, converted, k
        if converted[0] is not frame:
            converted = (frame, _convert(frame, info.rotation, transform, upscale))
        arr = converted[1]
        if out is None:
            h, w, c = arr.shape
            out = np.empty((c, len(targets), h, w) if channels_first else (len(targets), h, w, c), np.uint8)
        if channels_first:
            out[:, k] = arr.transpose(2, 0, 1)
        else:
            out[k] = arr
        k += 1

    with _open(ref) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        if threads:
            stream.codec_context.thread_count = threads
        try:
            if seek:
                pts = int((targets[0] - half_period) / float(stream.time_base))
                container.seek(max(pts, 0), stream=stream, backward=True, any_frame=False)
            for frame in container.decode(stream):
                if frame.time is None:
                    continue
                t = float(frame.time)
                if seek and prev is None and t > targets[0] + half_period:
                    return None
                while k < len(targets) and targets[k] <= t:
                    use_prev = prev is not None and (targets[k] - prev[0]) <= (t - targets[k])
                    take(prev[1] if use_prev else frame)
                if k == len(targets):
                    break
                prev = (t, frame)
        except av.FFmpegError as err:
            raise VideoDecodeError(
                f"{ref_name(ref)}: decoding failed after {k} of {len(targets)} frames: {av_message(err)}"
            ) from err
    while k < len(targets) and prev is not None and targets[k] - prev[0] <= half_period:
        take(prev[1])
    if k < len(targets):
        raise VideoDecodeError(
            f"{ref_name(ref)}: got {k} of {len(targets)} frames; the stream ends near "
            f"{prev[0] if prev else 0.0:.3f}s but frame {indices[k]} (t={targets[k]:.3f}s) was needed "
            f"(the index says {info.num_frames} frames: truncated or corrupt file?)"
        )
    return out
