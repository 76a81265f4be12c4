"""``"module:Name"`` strings resolved on use: how the registries (families, attention methods) name their classes
without importing them (and diffusers' model code) until one is asked for."""

from __future__ import annotations

import importlib
from typing import Any


def import_object(target: str) -> Any:
    """``"module:Name"`` -> the object, importing ``module`` now."""
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)
