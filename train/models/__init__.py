"""Model family registry: ``model.family`` -> adapter class, imported only when asked for.

Adding a family is one adapter file plus one line in :data:`ADAPTERS`; everything outside ``train/models/`` asks
the registry (or the adapter class it returns) for family facts instead of naming a family itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from train.lazy import import_object

if TYPE_CHECKING:  # pragma: no cover
    from train.models.base import ModelAdapter

__all__ = ["ADAPTERS", "DEFAULT_FAMILY", "FAMILIES", "adapters", "get_adapter", "pipeline_families"]

#: family -> "module:Class" (lazy: importing the registry does not import diffusers' model code).
ADAPTERS: dict[str, str] = {
    "wan": "train.models.wan:WanAdapter",
    "hunyuan_video": "train.models.hunyuan_video:HunyuanVideoAdapter",
    "mochi": "train.models.mochi:MochiAdapter",
}

#: The valid ``model.family`` values, in registry order (what the recipe schema accepts).
FAMILIES: tuple[str, ...] = tuple(ADAPTERS)
#: ``model.family`` of a recipe that names none.
DEFAULT_FAMILY = "wan"


def get_adapter(family: str) -> type["ModelAdapter"]:
    """The adapter class of ``family``; ValueError naming ``model.family`` and the valid choices otherwise."""
    target = ADAPTERS.get(family) if isinstance(family, str) else None
    if target is None:
        raise ValueError(f"model.family must be one of {sorted(ADAPTERS)}, got {family!r}")
    return import_object(target)


def adapters() -> dict[str, type["ModelAdapter"]]:
    """Every registered family's adapter class (imports the adapter modules, not diffusers)."""
    return {family: get_adapter(family) for family in ADAPTERS}


def pipeline_families() -> dict[str, str]:
    """diffusers pipeline class name (``model_index.json`` ``_class_name``) -> family."""
    return {cls.pipeline_class: family for family, cls in adapters().items()}
