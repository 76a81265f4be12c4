"""Trainable block-sparse attention for long-video diffusion transformers.

Public API (torch + triton only; this package knows nothing of ``train`` or ``data``):

- :func:`block_sparse_attention` — differentiable attention over kept (query block, key block) pairs,
  Triton forward + backward on CUDA, a pure-PyTorch path everywhere.
- :func:`radial_block_mask`, :func:`mask_density` — the official Radial Attention mask rule.
- :func:`svg2_attention`, :class:`SVG2State`, :class:`SVG2Attention` — Sparse VideoGen2 (k-means routing).

Names resolve lazily so that ``import sparse_attn`` stays cheap (Triton is imported only when a kernel runs).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "block_sparse_attention": "sparse_attn.block_sparse",
    "radial_block_mask": "sparse_attn.radial",
    "mask_density": "sparse_attn.radial",
    "svg2_attention": "sparse_attn.svg2",
    "SVG2State": "sparse_attn.svg2",
    "SVG2Attention": "sparse_attn.svg2",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sparse_attn' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
