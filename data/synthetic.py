"""Synthetic video datasets: real H.264 mp4 files of moving, rotating, colour-changing shapes.

Each caption is generated from the same parameters that drew the video, so captions describe what is
on screen (which shape, which colour and colour change, which direction of motion, which spin). Used by
the quickstart and the tests, and handy to smoke-test a setup without downloading data.

    python -m data.synthetic --out DIR --num-videos N --frames F --size HxW [--fps R] [--seed S]
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Optional, Sequence

import av
import numpy as np


COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (240, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 180, 70),
    "cyan": (40, 200, 220),
    "blue": (40, 80, 230),
    "purple": (150, 60, 200),
    "pink": (240, 120, 190),
    "white": (245, 245, 245),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (12, 12, 12),
    "dark gray": (64, 64, 64),
    "navy blue": (20, 28, 80),
    "dark green": (16, 56, 30),
}
SHAPES = ("circle", "square", "triangle", "bar")
VIDEO_EXTENSIONS_WRITTEN = ".mp4"


@dataclass(frozen=True)
class ShapeTrack:
    """One shape's whole trajectory; positions are fractions of the frame, angles in degrees."""

    kind: str
    radius: float  # fraction of min(height, width)
    start: tuple[float, float]  # (x, y)
    end: tuple[float, float]
    spin_degrees: float  # total rotation over the clip; > 0 is clockwise on screen (y points down)
    color_from: str
    color_to: str

    def describe(self) -> str:
        text = f"a {self.color_from} {self.kind} moves {_direction(self.start, self.end)}"
        extras = []
        if self.kind != "circle" and abs(self.spin_degrees) >= 45:
            extras.append("spinning " + ("clockwise" if self.spin_degrees > 0 else "counterclockwise"))
        if self.color_to != self.color_from:
            extras.append(f"turning {self.color_to}")
        return text + (", " + " and ".join(extras) if extras else "")


def _direction(start: tuple[float, float], end: tuple[float, float]) -> str:
    dx, dy = end[0] - start[0], end[1] - start[1]
    horiz = "right" if dx > 0 else "left"
    vert = "bottom" if dy > 0 else "top"
    if abs(dx) >= 2 * abs(dy):
        return f"from the {'left' if dx > 0 else 'right'} to the {horiz}"
    if abs(dy) >= 2 * abs(dx):
        return f"from the {'top' if dy > 0 else 'bottom'} to the {vert}"
    return f"diagonally toward the {vert} {horiz}"


@dataclass(frozen=True)
class SceneSpec:
    background: str
    shapes: tuple[ShapeTrack, ...]

    def caption(self) -> str:
        sentences = [s.describe() for s in self.shapes] + [f"the background is {self.background}"]
        return " ".join(f"{t[0].upper()}{t[1:]}." for t in sentences)


def random_scene(rng: np.random.Generator, max_shapes: int = 2) -> SceneSpec:
    """Draw a scene whose caption can be read off its parameters."""
    background = str(rng.choice(list(BACKGROUNDS)))
    n = int(rng.integers(1, max_shapes + 1))
    kinds = rng.choice(SHAPES, size=n, replace=False)
    shapes = []
    for kind in kinds:
        radius = float(rng.uniform(0.14, 0.22))
        lo, hi = radius + 0.02, 1.0 - radius - 0.02
        start = (float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi)))
        # travel at least a third of the frame so the direction is unambiguous
        for _ in range(100):
            end = (float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi)))
            if math.dist(start, end) >= 0.33:
                break
        spin = 0.0 if kind == "circle" else float(rng.choice([-1, 1]) * rng.uniform(90, 270))
        c0, c1 = (str(c) for c in rng.choice(list(COLORS), size=2, replace=False))
        if rng.random() < 0.25:
            c1 = c0
        shapes.append(ShapeTrack(str(kind), radius, start, end, spin, c0, c1))
    return SceneSpec(background, tuple(shapes))


def _shape_mask(kind: str, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Inside test in the shape's own (rotated) coordinates; r is the circumradius in pixels."""
    if kind == "circle":
        return u * u + v * v <= r * r
    if kind == "square":
        s = r / math.sqrt(2.0)
        return (np.abs(u) <= s) & (np.abs(v) <= s)
    if kind == "bar":
        return (np.abs(u) <= r) & (np.abs(v) <= r / 3.0)
    if kind == "triangle":  # equilateral, apex up at rest: three half-planes
        inside = np.ones_like(u, dtype=bool)
        for k in range(3):
            a = math.radians(90 + 120 * k)
            nx, ny = math.cos(a), -math.sin(a)  # outward normal of the edge opposite vertex k (y down)
            inside &= -(u * nx + v * ny) <= r / 2.0
        return inside
    raise ValueError(f"unknown shape kind {kind!r}; expected one of {SHAPES}")


def render_frames(scene: SceneSpec, frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """[frames, height, width, 3] uint8. The background carries a fixed texture that pans slowly,
    so the encoder sees motion everywhere, as in real footage."""
    rng = np.random.default_rng(seed)
    texture = rng.normal(0.0, 10.0, size=(height + frames, width + frames, 1)).astype(np.float32)
    base = np.asarray(BACKGROUNDS[scene.background], np.float32)
    out = np.empty((frames, height, width, 3), np.uint8)
    short = min(height, width)
    for f in range(frames):
        t = f / max(frames - 1, 1)
        img = base + texture[f : f + height, f : f + width]
        for shape in scene.shapes:
            cx = (shape.start[0] + (shape.end[0] - shape.start[0]) * t) * width
            cy = (shape.start[1] + (shape.end[1] - shape.start[1]) * t) * height
            r = shape.radius * short
            x0, x1 = max(int(cx - r) - 1, 0), min(int(cx + r) + 2, width)
            y0, y1 = max(int(cy - r) - 1, 0), min(int(cy + r) + 2, height)
            if x0 >= x1 or y0 >= y1:
                continue
            dy, dx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
            dx -= cx
            dy -= cy
            theta = math.radians(shape.spin_degrees * t)
            c, s = math.cos(theta), math.sin(theta)
            u, v = dx * c + dy * s, -dx * s + dy * c  # undo the rotation
            mask = _shape_mask(shape.kind, u, v, r)
            c0 = np.asarray(COLORS[shape.color_from], np.float32)
            c1 = np.asarray(COLORS[shape.color_to], np.float32)
            img[y0:y1, x0:x1][mask] = c0 + (c1 - c0) * t
        np.clip(img, 0, 255, out=img)
        out[f] = img.astype(np.uint8)
    return out


def _as_fraction(fps: float | Fraction) -> Fraction:
    rate = Fraction(fps).limit_denominator(1001)
    if rate <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    return rate


def write_mp4(
    path: str | Path,
    frames: np.ndarray,
    fps: float | Fraction,
    *,
    codec: str = "libx264",
    options: Optional[dict[str, str]] = None,
    faststart: bool = False,
    container_format: str = "mp4",
) -> Path:
    """Encode [F, H, W, 3] uint8 RGB frames to an mp4 (yuv420p), written to a temp name then renamed.

    ``faststart`` puts the index first (as web videos do); ``container_format`` e.g. "matroska"."""
    path = Path(path)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [F, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
    _, height, width, _ = frames.shape
    if height % 2 or width % 2:
        raise ValueError(f"height and width must be even for yuv420p, got {height}x{width}")
    tmp = path.with_name(f".{path.name}.tmp")
    container_options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(tmp), "w", format=container_format, options=container_options) as container:
        stream = container.add_stream(codec, rate=_as_fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if codec == "libx264":
            stream.options = {"preset": "veryfast", "crf": "20", **(options or {})}
        elif options:
            stream.options = dict(options)
        for arr in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    os.replace(tmp, path)
    return path


def _write_one(out: Path, i: int, frames: int, height: int, width: int, fps: float, seed: int) -> dict[str, str]:
    scene = random_scene(np.random.default_rng([seed, i]))
    name = f"video_{i:05d}.mp4"
    write_mp4(out / name, render_frames(scene, frames, height, width, seed=seed * 100003 + i), fps)
    return {"file_name": name, "caption": scene.caption()}


def write_synthetic_dataset(
    out: str | Path,
    num_videos: int,
    frames: int,
    height: int,
    width: int,
    fps: float = 16.0,
    seed: int = 0,
    *,
    workers: int = 1,
) -> Path:
    """Write ``num_videos`` mp4s plus ``metadata.jsonl`` (file_name, caption) into ``out``; returns ``out``.

    Deterministic given the arguments (``workers`` > 1 renders videos in parallel processes).
    metadata.jsonl is written last, so a folder with it is complete.
    """
    for name, value in (("num_videos", num_videos), ("frames", frames), ("height", height), ("width", width)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if height % 2 or width % 2:
        raise ValueError(f"height and width must be even (yuv420p), got {height}x{width}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    args = [(out, i, frames, height, width, fps, seed) for i in range(num_videos)]
    if workers > 1 and num_videos > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=min(workers, num_videos)) as pool:
            rows = list(pool.map(_write_one, *zip(*args)))
    else:
        rows = [_write_one(*a) for a in args]
    tmp = out / ".metadata.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, out / "metadata.jsonl")
    return out


def _parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size must look like HxW (e.g. 64x64), got {text!r}") from None
    return h, w


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m data.synthetic", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--num-videos", type=int, required=True)
    parser.add_argument("--frames", type=int, required=True)
    parser.add_argument("--size", type=_parse_size, required=True, help="HxW, both even")
    parser.add_argument("--fps", type=float, default=16.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    h, w = args.size
    out = write_synthetic_dataset(args.out, args.num_videos, args.frames, h, w, args.fps, args.seed)
    print(f"wrote {args.num_videos} videos ({args.frames} frames, {h}x{w}, {args.fps:g} fps) and metadata.jsonl to {out}")


if __name__ == "__main__":
    main()
