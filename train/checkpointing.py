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


def resolve_resume(run_dir: Path, resume_from: Optional[str]) -> Optional[Path]:
    """``latest`` -> newest complete checkpoint of the run (None when there is none yet); a path -> that folder."""
    if resume_from is None:
        return None
    if resume_from == "latest":
        found = list_checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(resume_from)
    if not (path / "accelerate").is_dir():
        raise FileNotFoundError(f"train.resume_from: {path} is not a checkpoint folder (no accelerate/ inside)")
    return path


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


def rotate(run_dir: Path, keep: int) -> None:
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def remove_run_outputs(run_dir: Path) -> None:
    """Checkpoints and final weights of an earlier run in the same folder (train.overwrite_output_dir)."""
    for sub in ("checkpoints", "final"):
        shutil.rmtree(Path(run_dir) / sub, ignore_errors=True)


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
