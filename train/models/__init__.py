"""Model family registry: ``model.family`` -> adapter class, imported only when asked for.

Adding a family is one adapter file plus one line here.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from train.models.base import ModelAdapter

__all__ = ["ADAPTERS", "get_adapter"]

#: family -> "module:Class" (lazy: importing the registry does not import diffusers' model code).
ADAPTERS: dict[str, str] = {
    "wan": "train.models.wan:WanAdapter",
    "hunyuan_video": "train.models.hunyuan_video:HunyuanVideoAdapter",
    "mochi": "train.models.mochi:MochiAdapter",
}


def get_adapter(family: str) -> type["ModelAdapter"]:
    """The adapter class of ``family``; ValueError naming ``model.family`` and the valid choices otherwise."""
    target = ADAPTERS.get(family) if isinstance(family, str) else None
    if target is None:
        raise ValueError(f"model.family must be one of {sorted(ADAPTERS)}, got {family!r}")
    module_name, class_name = target.split(":")
    return getattr(importlib.import_module(module_name), class_name)
