"""The family registry is the one way to a family's facts: adding a family is one adapter file plus one registry line.

Cheap checks only (class attributes and source text; no model is built): every registered family is discovered
and exposes every fact the rest of the code asks for, and no module of ``train/`` outside ``train/models/`` names a
family or one of its diffusers classes in code (docstrings and comments may explain).
"""

from __future__ import annotations

import ast
import inspect
import re
import typing
from pathlib import Path

import pytest

from train.models import ADAPTERS, DEFAULT_FAMILY, FAMILIES, adapters, get_adapter, pipeline_families
from train.models.base import ModelAdapter

TRAIN = Path(__file__).resolve().parents[2] / "train"


def test_registry_lists_the_families_in_one_place() -> None:
    assert FAMILIES == tuple(ADAPTERS) and len(FAMILIES) >= 3
    assert DEFAULT_FAMILY in FAMILIES
    assert set(adapters()) == set(FAMILIES)
    with pytest.raises(ValueError, match=r"model.family must be one of \['hunyuan_video', 'mochi', 'wan'\]"):
        get_adapter("hunyuan")  # the radial rule's old spelling is not a family


def test_recipe_schema_accepts_exactly_the_registered_families() -> None:
    from train.config_schema import ModelConfig

    assert typing.get_args(typing.get_type_hints(ModelConfig)["family"]) == FAMILIES
    assert ModelConfig().family == DEFAULT_FAMILY


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_exposes_every_fact(family: str) -> None:
    import diffusers

    from sparse_attn.radial import MODELS as RADIAL_RULES

    cls = get_adapter(family)
    assert issubclass(cls, ModelAdapter) and not inspect.isabstract(cls), "every abstract method implemented"
    assert cls.family == family
    for name in ("display_name", "release_name", "pipeline_class", "transformer_class", "radial_rule"):
        value = getattr(cls, name, None)
        assert isinstance(value, str) and value, f"{cls.__name__}.{name}"
    # classes: real diffusers classes of the right kind, one pipeline class per family
    assert issubclass(getattr(diffusers, cls.pipeline_class), diffusers.DiffusionPipeline)
    assert issubclass(getattr(diffusers, cls.transformer_class), diffusers.ModelMixin)
    assert pipeline_families()[cls.pipeline_class] == family
    # attention, sampling, data
    assert cls.radial_rule in RADIAL_RULES
    assert isinstance(cls.default_fps, float) and cls.default_fps > 0
    assert isinstance(cls.frame_multiple, int) and cls.frame_multiple >= 1
    assert cls.default_lora_targets and all(isinstance(t, str) for t in cls.default_lora_targets)
    # export (ComfyUI names): a mapping function and whether originals fuse several diffusers modules
    assert isinstance(cls.comfyui_fuses, bool)
    assert cls.comfyui_key is not ModelAdapter.comfyui_key or not cls.comfyui_fuses
    # sequence parallelism: the family's own hooks (the base class only refuses)
    assert cls.sequence_parallel_hooks is not ModelAdapter.sequence_parallel_hooks
    # tiny random pipeline: the family's builder, written by the generic train.tiny code
    assert "tiny_pipeline" in vars(cls) and isinstance(inspect.getattr_static(cls, "tiny_pipeline"), classmethod)
    assert cls.save_tiny_random.__func__ is ModelAdapter.save_tiny_random.__func__


def test_family_facts_are_not_shared_by_two_families() -> None:
    classes = adapters().values()
    for name in ("pipeline_class", "transformer_class", "display_name", "release_name"):
        values = [getattr(c, name) for c in classes]
        assert len(set(values)) == len(values), name


# -- nobody else names a family ----------------------------------------------------------------------------------


def _forbidden() -> tuple[set[str], re.Pattern]:
    """Family spellings (and the radial rule's old one) as identifier tokens, and a pattern of every family name
    and diffusers class name as a word inside string literals."""
    names: set[str] = set(FAMILIES) | {"hunyuan"}
    words: set[str] = set(names)
    for cls in adapters().values():
        for attr in ("display_name", "release_name", "pipeline_class", "transformer_class", "vae_class", "radial_rule"):
            value = getattr(cls, attr, None)
            if isinstance(value, str):
                words.add(value)
        words.add(getattr(cls, "stock_processor", "").rsplit(":", 1)[-1])
    words.discard("")
    return names, re.compile(r"(?<![\w.])(" + "|".join(sorted(map(re.escape, words), key=len, reverse=True)) + r")(?!\w)")


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                ids.add(id(first.value))
    return ids


def _family_mentions(source: str, filename: str, names: set[str], pattern: re.Pattern) -> list[str]:
    tree = ast.parse(source, filename=filename)
    docstrings = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            match = pattern.search(node.value)
            if match:
                found.append(f"{where}: string {match.group(0)!r}")
        identifier = None
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            identifier = node.name
        elif isinstance(node, ast.Name):
            identifier = node.id
        elif isinstance(node, ast.Attribute):
            identifier = node.attr
        elif isinstance(node, ast.arg):
            identifier = node.arg
        if identifier and names & set(identifier.lower().split("_")):
            found.append(f"{where}: identifier {identifier!r}")
    return found


def test_the_scan_finds_what_it_looks_for() -> None:
    """The check below can fail: a family table, a class name and a family-named function are all caught."""
    source = (
        '"""Docstrings may name Wan2.1 and HunyuanVideoPipeline."""\n'
        'FPS = {"wan": 16.0}  # comments may too: mochi\n'
        "def _install_mochi(x):\n"
        '    return f"load a {x} HunyuanVideoTransformer3DModel"\n'
    )
    found = _family_mentions(source, "probe.py", *_forbidden())
    assert sorted(f.split(": ", 1)[1] for f in found) == sorted(
        ["string 'wan'", "identifier '_install_mochi'", "string 'HunyuanVideoTransformer3DModel'"]
    )


def test_no_module_outside_train_models_names_a_family() -> None:
    names, pattern = _forbidden()
    found = []
    for path in sorted(TRAIN.rglob("*.py")):
        if "models" in path.relative_to(TRAIN).parts[:1]:
            continue
        found += _family_mentions(path.read_text(), str(path.relative_to(TRAIN.parent)), names, pattern)
    assert not found, "family facts belong to the adapter (train/models/<family>.py):\n" + "\n".join(found)
