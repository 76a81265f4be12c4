"""Attention for training and sampling: the router (dispatch, sequence parallelism, steps) and one module per method.

- ``router.py``: :class:`AttentionRouter`, what every family's attention processor calls.
- ``methods/``: one module per ``attention.type`` (dense, radial, svg2) behind the registry ``METHODS``.
- ``check.py``: the one validation of an ``AttentionConfig``.

This package imports neither ``train.models`` nor ``train.config``: the adapters and the recipe loader import it.
"""

from __future__ import annotations

from train.attention.check import check_attention_config
from train.attention.methods import METHODS, get_method
from train.attention.router import AttentionRouter

__all__ = ["AttentionRouter", "METHODS", "check_attention_config", "get_method"]
