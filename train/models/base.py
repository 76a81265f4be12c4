"""The contract every model family adapter fulfils.

The trainer, the sampler and the exporter only talk to a family through this
interface, so adding a family means one new file plus a registry line
(``train/models/__init__.py``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, Optional

import torch
from torch import nn

from train.geometry import VideoGeometry

__all__ = ["ModelAdapter", "VideoGeometry"]


class ModelAdapter(ABC):
    """One diffusers video DiT family (Wan2.1, HunyuanVideo, Mochi)."""

    family: ClassVar[str]
    frame_multiple: ClassVar[int]  # valid pixel frame counts are frame_multiple * k + 1
    default_lora_targets: ClassVar[list[str]]

    def __init__(self, pretrained: str, revision: Optional[str] = None, dtype: torch.dtype = torch.bfloat16) -> None:
        self.pretrained = pretrained
        self.revision = revision
        self.dtype = dtype

    # -- shapes -----------------------------------------------------------------------------
    @abstractmethod
    def geometry(self, frames: int, height: int, width: int) -> VideoGeometry:
        """Latent and token sizes; raises ValueError naming frames/height/width when the VAE or patching can't take them."""

    # -- loading ----------------------------------------------------------------------------
    @abstractmethod
    def load_transformer(self) -> nn.Module:
        """The family's diffusers transformer from ``pretrained`` (Hub id or local diffusers folder)."""

    @abstractmethod
    def load_encoders(self, device: torch.device) -> Any:
        """VAE, text encoder(s) and tokenizer(s), frozen, on ``device``; passed back to the encode_* methods."""

    @abstractmethod
    def load_pipeline(self, transformer: Optional[nn.Module] = None) -> Any:
        """The family's diffusers pipeline (for validation and sampling), optionally with a given transformer."""

    # -- conditioning -----------------------------------------------------------------------
    @abstractmethod
    def encode_videos(self, encoders: Any, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, F, H, W] pixels in [-1, 1] -> normalised latents [B, C, T, h, w] as the transformer expects them."""

    @abstractmethod
    def encode_prompts(self, encoders: Any, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Text conditioning tensors for the transformer (embeddings, masks, pooled), batch-first."""

    # -- flow matching ----------------------------------------------------------------------
    @abstractmethod
    def sample_sigmas(self, batch: int, generator: Optional[torch.Generator], device: torch.device) -> torch.Tensor:
        """Noise levels in (0, 1) drawn as the family's training recipe does (shifted / logit-normal)."""

    @abstractmethod
    def training_pair(
        self, latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(noisy latents, timesteps for the transformer, regression target) for the family's convention."""

    @abstractmethod
    def predict(
        self, transformer: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """Transformer output with the shape of the target."""

    # -- attention --------------------------------------------------------------------------
    @abstractmethod
    def install_attention(self, transformer: nn.Module, attention: Any, geometry: VideoGeometry) -> Any:
        """Route the video self-attention of every block through sparse_attn (diffusers processors).

        Returns an object with ``density() -> float`` (mean block density of the last forward), so the
        trainer can log it. ``attention`` is the recipe's AttentionConfig.
        """

    # -- tiny models --------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def save_tiny_random(cls, out_dir: str, seed: int = 0) -> str:
        """Write a tiny random-weight diffusers pipeline folder of this family (model_index.json, offline
        tokenizer(s)); used by the tests and the quickstart, where no weights can be downloaded."""

    # -- export -----------------------------------------------------------------------------
    #: Whether several diffusers modules map to one fused original weight (exporting that needs the base config).
    comfyui_fuses: ClassVar[bool] = False

    def comfyui_key(self, diffusers_module: str) -> Optional[str]:
        """Original (ComfyUI) module name for a diffusers module name, or None where the family has none."""
        return None
