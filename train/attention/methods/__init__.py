"""Attention method registry: ``attention.type`` -> method class, imported only when asked for.

Adding a method is one module in this folder (a subclass of :class:`~train.attention.methods.base.AttentionMethod`)
plus one line here; the recipe key ``attention.type``, the sampler's ``--attention`` and the validation take their
choices from this dict.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from train.lazy import import_object

if TYPE_CHECKING:  # pragma: no cover
    from train.attention.methods.base import AttentionMethod

__all__ = ["METHODS", "get_method"]

#: attention.type -> "module:Class" (lazy: importing the registry imports no method code).
METHODS: dict[str, str] = {
    "dense": "train.attention.methods.dense:DenseAttention",
    "radial": "train.attention.methods.radial:RadialAttention",
    "svg2": "train.attention.methods.svg2:SVG2Attention",
}


def get_method(name: str) -> type["AttentionMethod"]:
    """The method class of ``name``; ValueError naming ``attention.type`` and the valid choices otherwise."""
    target = METHODS.get(name) if isinstance(name, str) else None
    if target is None:
        raise ValueError(f"attention.type: expected one of {', '.join(METHODS)}; got {name!r}")
    return import_object(target)
