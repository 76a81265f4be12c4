"""Measures of the extension benchmark: object positions against the scene's ground truth, PSNR / SSIM of
decoded frames, and attention FLOPs (shared/notes/kernels.md section 3)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["detect_centres", "position_error", "psnr", "ssim", "attention_flops"]

#: Fraction of the frame's pixels that must differ from the background for "object found" (the smallest shape
#: covers ~2.6% of the frame).
MIN_AREA = 0.005
#: ... and at most this fraction (twice the largest shape, a circle of radius 0.22): a frame that differs from the
#: background almost everywhere (noise, a wrong background) has no identifiable object.
MAX_AREA = 0.3
#: A pixel is foreground when its RGB distance to the background colour exceeds 3/4 of the object-background
#: distance, capped here. The smallest object-background distance of data/synthetic.py's palette (colour blends
#: included) is 77; the background texture (std 10 on all channels at once, distance 17.3|z|) crosses 58 for
#: 0.1% of the pixels, which the median below ignores.
MAX_THRESHOLD = 60.0


def detect_centres(frames: torch.Tensor, colours: torch.Tensor, backgrounds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the (single) object is in each frame: the median of the foreground pixels' coordinates.

    ``frames`` uint8 ``[B, T, H, W, 3]``, ``colours`` ``[B, T, 3]`` (the object's colour in that frame, from the
    scene: it sets how far from the background a pixel must be), ``backgrounds`` ``[B, 3]``. Colour-agnostic on
    purpose: this measures where the object went, PSNR/SSIM measure how it looks. The median ignores scattered
    outliers (texture tails, sampling speckle). Returns ``(centres [B, T, 2]`` as fractions (x, y),
    ``found [B, T])``; frames with too little or too much foreground get the frame centre (a guess without
    information).
    Pixel ``x`` is at ``x / W``, the convention of ``render_frames`` (a shape centred at ``cx * W``).
    """
    b, t, h, w, _ = frames.shape
    colours = colours.to(frames.device, torch.float32)
    bg = backgrounds.to(frames.device, torch.float32)
    separation = (colours - bg[:, None, :]).norm(dim=-1)  # [B, T]
    threshold = (0.75 * separation).clamp(max=MAX_THRESHOLD)
    mask = (frames.float() - bg[:, None, None, None, :]).norm(dim=-1) > threshold[..., None, None]  # [B, T, H, W]
    count = mask.flatten(-2).sum(-1)
    found = (count >= max(1, int(MIN_AREA * h * w))) & (count <= MAX_AREA * h * w)
    xs = (torch.arange(w, device=frames.device, dtype=torch.float32) / w).expand(h, w)
    ys = (torch.arange(h, device=frames.device, dtype=torch.float32) / h)[:, None].expand(h, w)
    centre = []
    for coord in (xs, ys):
        values = torch.where(mask, coord, torch.full_like(coord, float("inf"))).flatten(-2)
        ordered = values.sort(-1).values
        lo = ((count - 1).clamp_min(0) // 2)[..., None]  # lower and upper median, averaged
        hi = (count // 2).clamp(max=h * w - 1)[..., None]
        centre.append(0.5 * (ordered.gather(-1, lo) + ordered.gather(-1, hi))[..., 0])
    centres = torch.stack(centre, -1)
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
