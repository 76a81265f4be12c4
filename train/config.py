"""Recipes: YAML files plus ``a.b=value`` overrides, validated once into typed objects.

Every problem is reported as a :class:`ConfigError` whose message names the key, what was expected and,
for a misspelt key or choice, the closest valid one; entry points print that one line and exit non-zero.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import tempfile
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from train.attention.check import check_attention_config
from train.config_schema import RecipeConfig


class _Yaml12Loader(yaml.SafeLoader):
    """YAML as people expect it (1.2 rules): ``no``/``on`` stay strings, ``1e-4`` is a number."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."),
)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 - a SafeLoader subclass


class ConfigError(ValueError):
    """A recipe or override that cannot be used; the message is meant to be shown to the user as is."""


# --------------------------------------------------------------------------------------------------------------------
# loading


def load_config(path: Optional[str | os.PathLike], overrides: Optional[list[str]] = None) -> RecipeConfig:
    """Read a recipe, apply overrides, check types and required values."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_yaml(Path(path))
    for item in overrides or []:
        _apply_override(raw, item)
    cfg = _build(RecipeConfig, raw, prefix="")
    _check_required(cfg)
    return cfg


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = _yaml_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}: malformed YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (model:, data:, train: ...), got {type(data).__name__}")
    return data


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected the form section.key=value, e.g. train.max_steps=100")
    try:
        value = _yaml_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


# --------------------------------------------------------------------------------------------------------------------
# typed conversion


def _build(cls: type, raw: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "the config"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a section (mapping), got {_describe(raw)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            raise ConfigError(f"unknown key '{prefix}{key}'{_suggest(str(key), list(fields), prefix)}")
    values = {}
    for name, f in fields.items():
        if name in raw:
            values[name] = _convert(hints[name], raw[name], f"{prefix}{name}")
    return cls(**values)


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".")
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _convert(inner[0], value, key)
        raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover - schema bug
    if origin is Literal:
        if value not in args:
            choices = ", ".join(map(str, args))
            hint = _suggest(str(value), [str(a) for a in args], "") if isinstance(value, str) else ""
            raise ConfigError(f"{key}: expected one of {choices}; got {_describe(value)}{hint}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {_describe(value)}")
        return [_convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {_describe(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {_describe(value)}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string; accept what users mean
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {_describe(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {_describe(value)}")
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover - schema bug


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _suggest(word: str, options: list[str], prefix: str) -> str:
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.5)
    return f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(options)}" if prefix or options else ""


# --------------------------------------------------------------------------------------------------------------------
# semantic checks that need more than one key


def _check_required(cfg: RecipeConfig) -> None:
    try:
        check_attention_config(cfg.attention)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if not cfg.model.pretrained:
        raise ConfigError("missing required value model.pretrained (a Hub id or a local diffusers folder)")
    if not cfg.data.path:
        raise ConfigError("missing required value data.path (a local video folder or a Hub dataset id)")
    positive = {
        "train.max_steps": cfg.train.max_steps,
        "train.batch_size": cfg.train.batch_size,
        "train.gradient_accumulation_steps": cfg.train.gradient_accumulation_steps,
        "train.checkpoint_every": cfg.train.checkpoint_every,
        "train.checkpoints_keep": cfg.train.checkpoints_keep,
        "train.log_every": cfg.train.log_every,
        "data.frames": cfg.data.frames,
        "data.height": cfg.data.height,
        "data.width": cfg.data.width,
        "lora.rank": cfg.lora.rank,
        "parallel.sequence_parallel_size": cfg.parallel.sequence_parallel_size,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key}: expected a positive integer, got {value}")
    for key, value in (("train.learning_rate", cfg.train.learning_rate), ("train.max_grad_norm", cfg.train.max_grad_norm)):
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{key}: expected a positive finite number, got {value}")
    if cfg.data.fps <= 0:
        raise ConfigError(f"data.fps: expected a positive number, got {cfg.data.fps}")
    for i, bucket in enumerate(cfg.data.buckets):
        if len(bucket) != 3 or any(v < 1 for v in bucket):
            raise ConfigError(f"data.buckets[{i}]: expected [frames, height, width] of positive integers, got {bucket}")
    v = cfg.validation
    if v.every_steps < 0:
        raise ConfigError(f"validation.every_steps: expected 0 (off) or a positive integer, got {v.every_steps}")
    if v.every_steps and not v.prompts:
        raise ConfigError(f"validation.every_steps={v.every_steps} but validation.prompts is empty: add prompts or set every_steps=0")
    if v.num_inference_steps < 1:
        raise ConfigError(f"validation.num_inference_steps: expected a positive integer, got {v.num_inference_steps}")
    for key in ("frames", "height", "width"):
        value = getattr(v, key)
        if value is not None and value < 1:
            raise ConfigError(f"validation.{key}: expected a positive integer (or null: the data's), got {value}")
    if cfg.train.lr_warmup_steps < 0:
        raise ConfigError(f"train.lr_warmup_steps: expected an integer >= 0, got {cfg.train.lr_warmup_steps}")
    if cfg.train.max_bad_steps_in_a_row < 1:
        raise ConfigError(f"train.max_bad_steps_in_a_row: expected a positive integer, got {cfg.train.max_bad_steps_in_a_row}")
    if cfg.train.resume_from not in (None, "latest") and not Path(cfg.train.resume_from).is_dir():
        raise ConfigError(f"train.resume_from: expected 'latest' or an existing checkpoint folder, got {cfg.train.resume_from!r}")


# --------------------------------------------------------------------------------------------------------------------
# saving


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Any) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write the resolved recipe atomically (temp file in the same folder, then rename)."""
    write_text_atomic(Path(path), dump_config(cfg))


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
