"""Attention for training and sampling: the router (dispatch, sequence parallelism, steps) and one module per method.

- ``router.py``: :class:`AttentionRouter`, what every family's attention processor calls.
- ``methods/``: one module per ``attention.type`` (dense, radial, svg2) behind the registry ``METHODS``.
- ``check.py``: the one validation of an ``AttentionConfig``.

This package imports neither ``train.models`` nor ``train.config``: the adapters and the recipe loader import it.
Checking a config imports no torch (``train.config`` stays light: a bad recipe fails fast, also under
``accelerate launch``); the router, and torch with it, is imported when first asked for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from train.attention.check import check_attention_config
from train.attention.methods import METHODS, get_method

if TYPE_CHECKING:  # pragma: no cover
    from train.attention.router import AttentionRouter

__all__ = ["AttentionRouter", "METHODS", "check_attention_config", "get_method"]


def __getattr__(name: str) -> Any:
    if name == "AttentionRouter":
        from train.attention.router import AttentionRouter

        return AttentionRouter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
