"""``attention.type: dense``: PyTorch SDPA everywhere; also the router's path for every call it runs dense."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from train.attention.methods.base import AttentionCall, AttentionMethod

if TYPE_CHECKING:  # pragma: no cover
    from torch import Tensor

__all__ = ["DenseAttention", "sdpa"]


def sdpa(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor]) -> Tensor:
    """Dense attention of ``[B, H, N, D]`` q, k, v; ``key_padding_mask`` bool ``[B, N]``, True = valid key."""
    from torch.nn.functional import scaled_dot_product_attention

    mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
    return scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)


class DenseAttention(AttentionMethod):
    """No sparsity: the router sends every layer to :func:`sdpa` (counted as dense calls, density 1.0)."""

    sparse = False

    def attend(self, q: Tensor, k: Tensor, v: Tensor, call: AttentionCall) -> tuple[Tensor, Optional[float]]:
        return sdpa(q, k, v, call.key_padding_mask), 1.0
