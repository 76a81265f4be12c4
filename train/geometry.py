"""Token geometry of one clip: the one fact both the adapters and the attention router need.

It lives outside ``train.models`` so the attention code can use it without importing the adapters.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VideoGeometry:
    """Token layout of one clip after the VAE and the patch embedding."""

    frames: int  # pixel frames
    height: int
    width: int
    latent_frames: int
    latent_height: int
    latent_width: int
    tokens_per_frame: int  # video tokens of one latent frame after patchify

    @property
    def video_tokens(self) -> int:
        return self.latent_frames * self.tokens_per_frame
