"""The one validation of an ``AttentionConfig``: recipes (``train.config``), the sampler (``SampleOptions`` and
``train/sample.py``'s flags) and the router all call :func:`check_attention_config`; only the names of the keys in
its messages differ (``attention.top_p`` in a recipe, ``--top-p`` on the command line)."""

from __future__ import annotations

import difflib
import typing

from train.attention.methods import METHODS, get_method
from train.attention.methods.base import KeyName
from train.config_schema import AttentionConfig

__all__ = ["BACKENDS", "MIN_BLOCK_SIZE", "check_attention_config", "recipe_key"]

#: Backends of sparse_attn's ops (``backend=``), as the schema's type lists them.
BACKENDS: tuple[str, ...] = typing.get_args(typing.get_type_hints(AttentionConfig)["backend"])
#: The smallest block the block-sparse kernels and ``radial_block_mask`` accept.
MIN_BLOCK_SIZE = 16


def recipe_key(field: str) -> str:
    """How a recipe names an ``AttentionConfig`` field."""
    return f"attention.{field}"


def check_attention_config(cfg: AttentionConfig, key: KeyName = recipe_key) -> None:
    """Raise ValueError ``"<key>: expected ..., got ..."`` for the first bad value (TypeError for a non-config).

    Every registered method checks its own keys, whatever ``cfg.type`` is: a bad value is a mistake either way."""
    if not isinstance(cfg, AttentionConfig):
        raise TypeError(f"attention config must be an AttentionConfig, got {type(cfg).__name__}")
    if cfg.type not in METHODS:
        close = difflib.get_close_matches(str(cfg.type), list(METHODS), n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"{key('type')}: expected one of {', '.join(METHODS)}; got {cfg.type!r} "
                         f"({type(cfg.type).__name__}){hint}")
    if cfg.backend not in BACKENDS:
        raise ValueError(f"{key('backend')}: expected one of {', '.join(BACKENDS)}; got {cfg.backend!r}")
    if isinstance(cfg.block_size, bool) or not isinstance(cfg.block_size, int) or cfg.block_size < MIN_BLOCK_SIZE:
        raise ValueError(f"{key('block_size')}: expected an integer >= {MIN_BLOCK_SIZE}, got {cfg.block_size!r}")
    if isinstance(cfg.dense_layers, bool) or not isinstance(cfg.dense_layers, int) or cfg.dense_layers < 0:
        raise ValueError(f"{key('dense_layers')}: expected an integer >= 0, got {cfg.dense_layers!r}")
    for name in METHODS:
        get_method(name).check_config(cfg, key)
