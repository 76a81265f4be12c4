"""``attention.type: radial``: the family's radial block mask (cached per token layout) through our block-sparse op."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

from train.attention.methods.base import AttentionCall, AttentionMethod, KeyName
from train.config_schema import AttentionConfig
from train.geometry import VideoGeometry

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import Tensor

__all__ = ["RadialAttention"]


class RadialAttention(AttentionMethod):
    """Radial Attention: a static block mask per (geometry, text tokens, device); its density is the mask's."""

    writes_bnhd = True

    def __init__(self, cfg: AttentionConfig, *, radial_rule: str) -> None:
        from sparse_attn.radial import MODELS

        super().__init__(cfg, radial_rule=radial_rule)
        if not isinstance(radial_rule, str) or radial_rule not in MODELS:  # the rule names are sparse_attn's
            raise ValueError(f"radial_rule must be one of {sorted(MODELS)}, got {radial_rule!r}")
        self.radial_rule = radial_rule
        self._masks: dict[tuple, tuple[Tensor, float]] = {}

    @classmethod
    def check_config(cls, cfg: AttentionConfig, key: KeyName) -> None:
        value = cfg.decay_factor
        if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"{key('decay_factor')}: expected a positive finite number, got {value!r}")
        if cfg.attention_sink not in (None, True, False):
            raise ValueError(f"{key('attention_sink')}: expected true, false or null, got {cfg.attention_sink!r}")

    def mask(self, geometry: VideoGeometry, text_tokens: int = 0, device: Optional[torch.device] = None) -> Tensor:
        """The cached radial block mask of ``geometry`` (``bool [Nb, Nb]``)."""
        import torch

        return self.mask_and_density(geometry, text_tokens, torch.device(device or "cpu"))[0]

    def mask_and_density(self, geometry: VideoGeometry, text_tokens: int, device: "torch.device") -> tuple[Tensor, float]:
        g, c = geometry, self.cfg
        key = (g.latent_frames, g.tokens_per_frame, text_tokens, str(device))
        hit = self._masks.get(key)
        if hit is None:
            from sparse_attn import mask_density, radial_block_mask

            mask = radial_block_mask(
                g.latent_frames,
                g.tokens_per_frame,
                block_size=c.block_size,
                decay_factor=c.decay_factor,
                model=self.radial_rule,
                text_tokens=text_tokens,
                attention_sink=c.attention_sink,
                device=device,
            )
            hit = (mask, mask_density(mask, block_size=c.block_size))
            if len(self._masks) >= 16:  # a few buckets at most; drop the oldest layout
                self._masks.pop(next(iter(self._masks)))
            self._masks[key] = hit
        return hit

    def attend(self, q: Tensor, k: Tensor, v: Tensor, call: AttentionCall) -> tuple[Tensor, Optional[float]]:
        """``[B, H, N, D]`` q, k, v (views); the result ``[B, N, H, D]`` when ``call.bnhd`` (the kernels read the
        transposed views as the [B, N, H, D] tensors they are and write that layout)."""
        from sparse_attn import block_sparse_attention

        mask, density = self.mask_and_density(call.geometry, call.text_tokens, q.device)
        if call.bnhd:
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        out = block_sparse_attention(
            q, k, v, mask, block_size=self.cfg.block_size, backend=self.cfg.backend,
            key_padding_mask=call.key_padding_mask, **({"layout": "bnhd"} if call.bnhd else {}),
        )
        return out, density
