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
    """One diffusers video DiT family (Wan2.1, HunyuanVideo, Mochi): the one owner of every fact about it.

    Code outside ``train/models/`` reads these class attributes (through ``get_adapter(family)``) instead of
    keeping its own per-family tables.
    """

    #: ``model.family`` spelling, the registry key (``train/models/__init__.py``).
    family: ClassVar[str]
    #: Short name in messages ("frames must be of the form 4k+1 for HunyuanVideo").
    display_name: ClassVar[str]
    #: Name of the released model in export model-card titles ("Wan2.1 long-video fine-tune ...").
    release_name: ClassVar[str]
    #: diffusers classes: the pipeline (``model_index.json`` ``_class_name``; LoRA writing and loading, sampling)
    #: and the transformer (merging, full fine-tunes, meta-device parameter counts).
    pipeline_class: ClassVar[str]
    transformer_class: ClassVar[str]
    #: Rule of ``sparse_attn.radial_block_mask`` (``model=``) the family's radial attention uses.
    radial_rule: ClassVar[str]
    #: Frame rate of sampled mp4s when none is asked for (the family's native rate).
    default_fps: ClassVar[float]
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

    # -- sequence parallelism -------------------------------------------------------------------
    def install_sequence_parallel(self, transformer: nn.Module, sp: Any) -> list[Any]:
        """Ulysses sequence parallelism over ``sp`` (a ``train.sequence_parallel.SequenceParallel``) on the
        unwrapped diffusers ``transformer``: the generic checks, then the family's :meth:`sequence_parallel_hooks`.
        Returns the hook handles."""
        from train import sequence_parallel

        heads = sequence_parallel.check_heads(transformer, sp, self.family)
        return self.sequence_parallel_hooks(transformer, sp, heads)

    def sequence_parallel_hooks(self, transformer: nn.Module, sp: Any, heads: int) -> list[Any]:
        """Register the forward hooks that shard the video tokens entering the blocks (and the rotary tables with
        them) and gather them after the output projection (helpers in ``train.sequence_parallel``); return the
        handles. A family without sequence parallelism keeps this default."""
        raise ValueError(f"parallel.sequence_parallel_size > 1 is not implemented for model.family {self.family!r}")

    # -- tiny models --------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def tiny_pipeline(cls) -> Any:
        """The family's tiny random-weight diffusers pipeline object (tiny transformer / VAE sizes, tiny text
        encoders and offline tokenizers from ``train.tiny``); called under a fixed torch seed."""

    @classmethod
    def save_tiny_random(cls, out_dir: str, seed: int = 0) -> str:
        """Write a tiny random-weight diffusers pipeline folder of this family (model_index.json, offline
        tokenizer(s)); used by the tests and the quickstart, where no weights can be downloaded. The folder is
        built next to ``out_dir`` and renamed into place, so it is either complete or absent."""
        from train.tiny.pipeline import save_tiny_pipeline

        return save_tiny_pipeline(cls.tiny_pipeline, out_dir, seed)

    # -- export -----------------------------------------------------------------------------
    #: Whether several diffusers modules map to one fused original weight (exporting that needs the base config).
    comfyui_fuses: ClassVar[bool] = False

    def comfyui_key(self, diffusers_module: str) -> Optional[str]:
        """Original (ComfyUI) module name for a diffusers module name, or None where the family has none."""
        return None
