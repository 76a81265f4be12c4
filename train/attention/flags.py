"""The command-line form of an ``AttentionConfig``: one flag per field, derived from the schema.

``train/sample.py`` adds them with :func:`add_attention_flags`; a field added to ``AttentionConfig`` (a new method's
key) becomes a flag without touching the CLI. ``type`` is ``--attention``, every other field ``--<field-with-dashes>``.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, Callable

from train.attention.methods import METHODS
from train.config_schema import AttentionConfig

__all__ = ["add_attention_flags", "attention_flag", "attention_from_args", "parse_bool"]


def attention_flag(field_name: str) -> str:
    """The flag of an ``AttentionConfig`` field: ``--attention`` for ``type``, else ``--block-size`` ..."""
    return "--attention" if field_name == "type" else "--" + field_name.replace("_", "-")


def parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in {"1", "true", "yes", "on"}:
        return True
    if low in {"0", "false", "no", "off"}:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _flag_type(hint: Any) -> Callable[[str], Any]:
    """argparse ``type=`` of a field (Optional[X] as X; a Literal or str stays text, checked afterwards)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Union and len(args) == 1:
        hint = args[0]
    if hint is bool:
        return parse_bool
    return hint if hint in (int, float) else str


def add_attention_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per ``AttentionConfig`` field with the schema's default and ``help``; values are checked later by
    ``check_attention_config`` (naming the flag), not by argparse."""
    hints = typing.get_type_hints(AttentionConfig)
    for f in dataclasses.fields(AttentionConfig):
        flag = attention_flag(f.name)
        text = " | ".join(METHODS) if f.name == "type" else f.metadata.get("help", f"attention.{f.name} of a recipe")
        parser.add_argument(flag, dest=f"attention.{f.name}", metavar=flag[2:].upper().replace("-", "_"),
                            type=_flag_type(hints[f.name]), default=f.default, help=text)


def attention_from_args(args: argparse.Namespace) -> AttentionConfig:
    """The ``AttentionConfig`` that the flags of :func:`add_attention_flags` describe."""
    return AttentionConfig(**{f.name: getattr(args, f"attention.{f.name}") for f in dataclasses.fields(AttentionConfig)})
