"""Clips of the extension benchmark, their ground truth, and the pixel-space latent.

Scenes are ``data/synthetic.py``'s (``random_scene`` with one shape, drawn by ``render_frames``), rendered once at
the longest length T. A clip of length L is a window of L consecutive frames of such a scene, so every length
sees the same per-frame motion (the shape crosses the frame over T frames): a model trained at F frames has only
seen F-frame stretches, and extending it to 4F means longer context and RoPE positions it never saw, not a new
speed. The ground truth - the object's centre and colour in every frame - is computed from the same
``ShapeTrack`` parameters that ``render_frames`` draws from (no detector is trusted for it).

The "VAE" is exact: pixels in [-1, 1], normalised per RGB channel, folded ``factor x factor`` into channels
(``pixel_unshuffle``), no temporal compression. A random ``AutoencoderKLWan`` cannot reconstruct, and training one
would cost the GPU minutes the benchmark needs; with an invertible latent, decoded samples are exactly what the
transformer produced, so pixel metrics measure the transformer alone.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from data.synthetic import BACKGROUNDS, COLORS, SceneSpec, random_scene, render_frames

__all__ = ["SceneSet", "PixelLatent", "make_scenes", "caption_corpus"]


@dataclass
class SceneSet:
    """``n`` one-shape scenes rendered at ``frames`` frames, with per-frame ground truth."""

    scenes: list[SceneSpec]
    captions: list[str]
    pixels: torch.Tensor  # uint8 [n, T, H, W, 3]
    centres: torch.Tensor  # float32 [n, T, 2]: object centre (x, y) as fractions of width / height
    colours: torch.Tensor  # float32 [n, T, 3]: the object's RGB in each frame (0..255)
    backgrounds: torch.Tensor  # float32 [n, 3]: background RGB

    def __len__(self) -> int:
        return len(self.scenes)

    def to(self, device: torch.device) -> "SceneSet":
        return SceneSet(
            self.scenes, self.captions, self.pixels.to(device), self.centres.to(device), self.colours.to(device),
            self.backgrounds.to(device),
        )


def _render(args: tuple[SceneSpec, int, int, int, int]) -> np.ndarray:
    scene, frames, height, width, seed = args
    return render_frames(scene, frames, height, width, seed=seed)


def _truth(scene: SceneSpec, frames: int) -> tuple[np.ndarray, np.ndarray]:
    """Centres and colours per frame, by render_frames' own parametrisation (t = f / (frames - 1))."""
    (shape,) = scene.shapes
    t = np.arange(frames, dtype=np.float64) / max(frames - 1, 1)
    start, end = np.asarray(shape.start), np.asarray(shape.end)
    centres = start[None] + (end - start)[None] * t[:, None]
    c0, c1 = np.asarray(COLORS[shape.color_from], np.float64), np.asarray(COLORS[shape.color_to], np.float64)
    colours = c0[None] + (c1 - c0)[None] * t[:, None]
    return centres.astype(np.float32), colours.astype(np.float32)


def make_scenes(n: int, frames: int, height: int, width: int, seed: int, workers: int = 1) -> SceneSet:
    """``n`` scenes (deterministic in ``seed``), rendered in ``workers`` processes."""
    scenes = [random_scene(np.random.default_rng([seed, i]), max_shapes=1) for i in range(n)]
    jobs = [(s, frames, height, width, seed * 100003 + i) for i, s in enumerate(scenes)]
    if workers > 1 and n > 8:
        # fork where available: the children only run numpy (safe even after CUDA is initialised) and skip
        # re-importing torch, which spawn would do in every worker
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            clips = list(pool.map(_render, jobs, chunksize=max(1, n // (4 * workers))))
    else:
        clips = [_render(j) for j in jobs]
    truth = [_truth(s, frames) for s in scenes]
    return SceneSet(
        scenes=scenes,
        captions=[s.caption() for s in scenes],
        pixels=torch.from_numpy(np.stack(clips)),
        centres=torch.from_numpy(np.stack([c for c, _ in truth])),
        colours=torch.from_numpy(np.stack([c for _, c in truth])),
        backgrounds=torch.tensor([BACKGROUNDS[s.background] for s in scenes], dtype=torch.float32),
    )


def caption_corpus(n: int = 2000, seed: int = 987654321) -> list[str]:
    """Captions of a fixed set of scenes, to estimate the tiny tokenizer's vocabulary (independent of the split)."""
    return [random_scene(np.random.default_rng([seed, i]), max_shapes=1).caption() for i in range(n)]


def default_workers() -> int:
    return max(1, min(16, (os.cpu_count() or 1) - 1))


@dataclass(frozen=True)
class PixelLatent:
    """Exact invertible latent: per-channel normalised pixels folded ``factor x factor`` into ``3 factor^2``
    channels; latent frames = pixel frames (temporal factor 1)."""

    factor: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def channels(self) -> int:
        return 3 * self.factor**2

    @classmethod
    def fit(cls, pixels: torch.Tensor, factor: int) -> "PixelLatent":
        """Mean and std per RGB channel of ``pixels`` (uint8 [..., 3]) in [-1, 1], like a VAE's latents_mean/std."""
        x = pixels.reshape(-1, 3).float() / 127.5 - 1.0
        mean, std = x.mean(0), x.std(0).clamp_min(1e-3)
        return cls(factor, tuple(float(v) for v in mean), tuple(float(v) for v in std))  # type: ignore[arg-type]

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kw = dict(device=like.device, dtype=torch.float32)
        return torch.tensor(self.mean, **kw), torch.tensor(self.std, **kw)

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, T, H, W, 3]`` -> float32 ``[B, 3 f^2, T, H / f, W / f]``."""
        b, t, h, w, _ = frames.shape
        mean, std = self._stats(frames)
        x = (frames.float() / 127.5 - 1.0 - mean) / std
        x = F.pixel_unshuffle(x.permute(0, 1, 4, 2, 3).reshape(b * t, 3, h, w), self.factor)
        return x.view(b, t, self.channels, h // self.factor, w // self.factor).permute(0, 2, 1, 3, 4).contiguous()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`encode`, rounded and clamped to uint8 ``[B, T, H, W, 3]``."""
        b, c, t, h, w = latents.shape
        mean, std = self._stats(latents)
        x = F.pixel_shuffle(latents.float().permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w), self.factor)
        x = x.view(b, t, 3, h * self.factor, w * self.factor).permute(0, 1, 3, 4, 2) * std + mean
        return ((x + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
