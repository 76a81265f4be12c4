"""Checkpoint folders: written complete or not at all, rotated, found again on resume.

Layout (read by train/export.py)::

    <run>/checkpoints/checkpoint-<step:06d>/
        accelerate/                 accelerator.save_state: model/engine, optimizer, scheduler, RNG, EMA
        weights/lora.safetensors    mode=lora: peft state dict (keys like blocks.0.attn1.to_q.lora_A.weight)
        weights/transformer/        mode=full: transformer.save_pretrained
        meta.json                   what export and the model card need
        training_state.json         step and data position for an exact resume
    <run>/final/                    the same without accelerate/ and training_state.json

Every folder is assembled under a hidden temporary name and renamed when complete, so an interrupted save
never leaves a folder that looks usable.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import save_file

from train.config import write_text_atomic

_CKPT = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:06d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _CKPT.match(p.name))]
    return [p for _, p in sorted(found)]


def damage(folder: Path) -> Optional[str]:
    """Why a checkpoint folder cannot be loaded (naming the file), or None when it looks complete.

    Cheap structural checks, no tensor is read: JSON files parse, safetensors headers fit their file, torch zip
    archives have their central directory (a truncated file loses it), and the files a resume needs are there.
    """
    folder = Path(folder)
    if not (folder / "accelerate").is_dir():
        return f"{folder / 'accelerate'} is missing"
    if not (folder / "training_state.json").is_file():
        return f"{folder / 'training_state.json'} is missing"
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        problem = _file_damage(path)
        if problem:
            return f"{path}: {problem}"
    return None


def _file_damage(path: Path) -> Optional[str]:
    import struct
    import zipfile

    try:
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".safetensors":
            with open(path, "rb") as fh:
                head = fh.read(8)
                if len(head) < 8:
                    return "truncated (no safetensors header)"
                (n,) = struct.unpack("<Q", head)
                header = json.loads(fh.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            if path.stat().st_size < 8 + n + end:
                return f"truncated ({path.stat().st_size} bytes, the header needs {8 + n + end})"
        elif path.suffix in (".bin", ".pt", ".pth", ".pkl") and path.stat().st_size > 0:
            with open(path, "rb") as fh:
                is_zip = fh.read(4) == b"PK\x03\x04"
            if is_zip:
                with zipfile.ZipFile(path) as zf:
                    zf.namelist()
        elif path.suffix in (".bin", ".pt", ".pth", ".pkl"):
            return "empty file"
    except (ValueError, UnicodeDecodeError, KeyError, TypeError, struct.error) as err:
        return f"damaged ({type(err).__name__}: {str(err)[:120]})"
    except (zipfile.BadZipFile, OSError) as err:
        return f"damaged or truncated ({str(err)[:120]})"
    return None


def staging_dir(final: Path) -> Path:
    return final.parent / f".tmp-{final.name}"


def begin(final: Path) -> Path:
    """Fresh temporary folder next to ``final`` (a leftover from an interrupted save is discarded)."""
    tmp = staging_dir(final)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit(tmp: Path, final: Path) -> None:
    """Replace ``final`` by the completed ``tmp`` folder."""
    if final.exists():
        old = final.parent / f".old-{final.name}"
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)


def rotate(run_dir: Path, keep: int, protect: Optional[str] = None) -> None:
    """Keep the newest ``keep`` checkpoints, and always the one named ``protect`` (the last one written before a
    run of non-finite steps: the one to resume from)."""
    for old in list_checkpoints(run_dir)[:-keep]:
        if old.name != protect:
            shutil.rmtree(old, ignore_errors=True)


RUN_OUTPUTS = ("checkpoints", "final", "export", "validation", "metrics.jsonl", "config-changes.jsonl")


def remove_run_outputs(run_dir: Path) -> list[str]:
    """What an earlier run wrote into the folder (train.overwrite_output_dir): checkpoints, final weights, export,
    validation videos and logs. Generated inputs kept there (a tiny model, synthetic data, a latent cache) stay."""
    removed = []
    for name in RUN_OUTPUTS:
        path = Path(run_dir) / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed


def write_weights(folder: Path, *, lora_state: Optional[dict[str, torch.Tensor]], full_model: Any = None) -> None:
    """Trainable weights in the exporter's format (called on the main process with gathered tensors)."""
    weights = folder / "weights"
    weights.mkdir(parents=True, exist_ok=True)
    if lora_state is not None:
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in lora_state.items()}
        save_file(tensors, str(weights / "lora.safetensors"), metadata={"format": "pt"})
    if full_model is not None:
        full_model.save_pretrained(str(weights / "transformer"), safe_serialization=True)


def write_json(path: Path, data: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True))


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())
