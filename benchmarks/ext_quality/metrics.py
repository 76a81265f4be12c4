"""Measures of the extension benchmark: object positions against the scene's ground truth, PSNR / SSIM of
decoded frames, and attention FLOPs (shared/notes/kernels.md section 3)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["detect_centres", "position_error", "psnr", "ssim", "attention_flops"]

#: Pixels that must match the object's colour for a frame to count as "object found".
MIN_PIXELS = 3
#: Colour distance (RGB, 0..255) under which a pixel belongs to the object: half the object-background
#: distance, at most this (the background texture has std 10 per pixel, so background pixels stay far above it).
MAX_COLOUR_DISTANCE = 60.0


def detect_centres(frames: torch.Tensor, colours: torch.Tensor, backgrounds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centroid of the pixels of the object's known colour in each frame.

    ``frames`` uint8 ``[B, T, H, W, 3]``, ``colours`` ``[B, T, 3]`` (the object's colour in that frame, from the
    scene), ``backgrounds`` ``[B, 3]``. Returns ``(centres [B, T, 2]`` as fractions (x, y), ``found [B, T])``;
    frames without the object get the frame centre (what a guess without information would say).
    Pixel ``x`` is at ``x / W``, the convention of ``render_frames`` (a shape centred at ``cx * W``).
    """
    b, t, h, w, _ = frames.shape
    colours = colours.to(frames.device, torch.float32)
    backgrounds = backgrounds.to(frames.device, torch.float32)
    dist = (frames.float() - colours[:, :, None, None, :]).norm(dim=-1)  # [B, T, H, W]
    separation = (colours - backgrounds[:, None, :]).norm(dim=-1)  # [B, T]
    mask = dist < (0.5 * separation).clamp(max=MAX_COLOUR_DISTANCE)[..., None, None]
    count = mask.sum((-2, -1)).float()
    xs = torch.arange(w, device=frames.device, dtype=torch.float32) / w
    ys = torch.arange(h, device=frames.device, dtype=torch.float32) / h
    cx = (mask.float().sum(-2) * xs).sum(-1) / count.clamp_min(1)
    cy = (mask.float().sum(-1) * ys).sum(-1) / count.clamp_min(1)
    found = count >= MIN_PIXELS
    centres = torch.stack([cx, cy], -1)
    centres = torch.where(found[..., None], centres, torch.full_like(centres, 0.5))
    return centres, found


def position_error(pred: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Euclidean distance ``[B, T]`` between centres (fractions of the frame side)."""
    return (pred.float() - truth.to(pred.device, torch.float32)).norm(dim=-1)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per frame ``[B, T]`` of uint8 ``[B, T, H, W, 3]`` clips (capped at 100 dB for equal frames)."""
    mse = (a.float() - b.float()).pow(2).mean((-3, -2, -1))
    return 10.0 * torch.log10(255.0**2 / mse.clamp_min(255.0**2 * 1e-10))


def _gaussian(size: int, sigma: float, device: torch.device) -> torch.Tensor:
    x = torch.arange(size, device=device, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 7, sigma: float = 1.5) -> torch.Tensor:
    """SSIM per frame ``[B, T]`` of the luma of uint8 ``[B, T, H, W, 3]`` clips (Wang et al. 2004 constants,
    Gaussian window; 7 px rather than 11 because the frames are 32-64 px)."""
    weights = torch.tensor([0.299, 0.587, 0.114], device=a.device)
    bt = a.shape[0] * a.shape[1]
    x = (a.float() @ weights).reshape(bt, 1, a.shape[2], a.shape[3])
    y = (b.float() @ weights).reshape(bt, 1, b.shape[2], b.shape[3])
    k = _gaussian(window, sigma, a.device)
    mx, my = F.conv2d(x, k), F.conv2d(y, k)
    vx = F.conv2d(x * x, k) - mx**2
    vy = F.conv2d(y * y, k) - my**2
    cxy = F.conv2d(x * y, k) - mx * my
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.mean((-3, -2, -1)).view(a.shape[0], a.shape[1])


def attention_flops(batch: int, heads: int, tokens: int, head_dim: int, layers: int, density: float, train: bool = True) -> float:
    """Self-attention FLOPs of one transformer call: ``4 B H N^2 D density`` per layer (2 GEMMs), x 3.5 for
    forward + backward (the FlashAttention convention); the text cross-attention is not counted."""
    if not (0.0 <= density <= 1.0) or math.isnan(density):
        raise ValueError(f"density must be in [0, 1], got {density}")
    fwd = 4.0 * batch * heads * float(tokens) ** 2 * head_dim * density * layers
    return fwd * (3.5 if train else 1.0)
