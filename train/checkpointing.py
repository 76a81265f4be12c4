"""The checkpoint folder format, written and read here only: complete or not at all, rotated, found again on
resume, resolved for export and ``sample.py --lora``.

Layout::

    <run>/checkpoints/checkpoint-<step:06d>/
        accelerate/                 accelerator.save_state: model/engine, optimizer, scheduler, RNG, EMA
        weights/lora.safetensors    mode=lora: peft state dict (keys like blocks.0.attn1.to_q.lora_A.weight)
        weights/transformer/        mode=full: transformer.save_pretrained
        meta.json                   what export and the model card need
        training_state.json         step and data position for an exact resume
    <run>/final/                    the same without accelerate/ and training_state.json

Every folder is assembled under a hidden temporary name and renamed when complete, so an interrupted save
never leaves a folder that looks usable. The trainer writes through ``save_checkpoint``/``save_final`` (from its
``train.run.Run``); train/resume.py (``list_checkpoints``, ``damage``, ``read_position``), train/exporting.py and
train/sampling.py (``resolve_checkpoint``, ``load_lora_state``) read.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional

import torch
from safetensors.torch import save_file

from train.config import config_to_dict, save_config, write_text_atomic
from train.models import ADAPTERS

if TYPE_CHECKING:  # pragma: no cover
    from train.run import Run

_CKPT = re.compile(r"^checkpoint-(\d+)$")
ACCELERATE_DIR = "accelerate"
META_FILE = "meta.json"
POSITION_FILE = "training_state.json"
RECIPE_FILE = "config.yaml"
LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")  # peft: <module>.lora_A/B.weight

# File names of an export folder (train/exporting.py writes them; train/sampling.py and the model card read them).
LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE: load_lora_weights(dir) prefers it
COMFYUI_FILE = "lora_comfyui.safetensors"


CHECKPOINTS_DIR = "checkpoints"  # <run>/checkpoints/checkpoint-<step>


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:06d}"


def checkpoint_path(run_dir: Path, name: str) -> Path:
    """Where checkpoint ``name`` (a :func:`checkpoint_name`) of a run lives."""
    return Path(run_dir) / CHECKPOINTS_DIR / name


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS_DIR
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
    if not (folder / ACCELERATE_DIR).is_dir():
        return f"{folder / ACCELERATE_DIR} is missing"
    if not (folder / POSITION_FILE).is_file():
        return f"{folder / POSITION_FILE} is missing"
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


RUN_OUTPUTS = (CHECKPOINTS_DIR, "final", "export", "validation", "metrics.jsonl", "config-changes.jsonl")


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

# ----------------------------------------------------------------------------------------------------------------
# writing a checkpoint / final/ from a live run (the trainer; collective calls run on every rank)


def _meta(run: "Run") -> dict[str, Any]:
    """meta.json: what export, the model card and ``sample.py --lora`` need to know about the weights."""
    c = run.cfg
    plugin = getattr(run.accelerator.state, "deepspeed_plugin", None)
    zero = int(plugin.zero_stage) if plugin is not None else 0
    return {
        "step": run.pos.step,
        "family": c.model.family,
        "mode": c.train.mode,
        "pretrained": c.model.pretrained,
        "revision": c.model.revision,
        "lora": config_to_dict(c.lora),
        "attention": config_to_dict(c.attention),
        "data": {"frames": c.data.frames, "height": c.data.height, "width": c.data.width, "fps": c.data.fps, "path": c.data.path},
        "train": {"max_steps": c.train.max_steps, "learning_rate": c.train.learning_rate, "batch_size": c.train.batch_size},
        "world_size": run.accelerator.num_processes,
        "zero_stage": zero,
        "ema": c.train.ema.enabled,
    }


class _FullModelWriter:
    """save_pretrained of a full fine-tune with the (possibly ZeRO-3-gathered) state dict."""

    def __init__(self, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
        self.model, self.state = model, state

    def save_pretrained(self, path: str, safe_serialization: bool = True) -> None:
        self.model.save_pretrained(path, state_dict=self.state, safe_serialization=safe_serialization)


def _write_run_weights(run: "Run", folder: Path) -> None:
    """Gather trainable weights (collective under ZeRO-3) and write them on the main process; the hooks may
    replace them first (EMA writes its averages)."""
    state = run.accelerator.get_state_dict(run.transformer)  # collective under ZeRO-3; None on other ranks there
    if not run.is_main:
        return
    unwrapped = run.accelerator.unwrap_model(run.transformer)
    state = dict(state)
    run.hooks.on_save_weights(run, state)
    if run.cfg.train.mode == "lora":
        from peft.utils import get_peft_model_state_dict

        write_weights(folder, lora_state=get_peft_model_state_dict(unwrapped, state_dict=state))
    else:
        write_weights(folder, lora_state=None, full_model=_FullModelWriter(unwrapped, state))
    write_json(folder / META_FILE, _meta(run))


def save_checkpoint(run: "Run") -> Path:
    """``<run>/checkpoints/checkpoint-<step>``: accelerate state, weights, meta, position, recipe; then rotation."""
    acc = run.accelerator
    final = checkpoint_path(run.run_dir, checkpoint_name(run.pos.step))
    tmp = staging_dir(final)
    if run.is_main:
        begin(final)
    acc.wait_for_everyone()
    acc.save_state(str(tmp / ACCELERATE_DIR))
    _write_run_weights(run, tmp)
    run.pos.newest_checkpoint = final.name
    if run.is_main:
        write_json(tmp / POSITION_FILE, run.pos.__dict__)
        save_config(run.cfg, tmp / RECIPE_FILE)  # the recipe these weights were trained with (resume checks it)
    acc.wait_for_everyone()
    if run.is_main:
        commit(tmp, final)
        rotate(run.run_dir, run.cfg.train.checkpoints_keep, protect=run.pos.protected_checkpoint)
        run.print(f"checkpoint -> {final}")
    acc.wait_for_everyone()
    return final


def save_final(run: "Run") -> Path:
    """``<run>/final``: weights, meta and the recipe (no optimizer state: not for resuming)."""
    acc = run.accelerator
    final = run.run_dir / "final"
    tmp = staging_dir(final)
    if run.is_main:
        begin(final)
    acc.wait_for_everyone()
    _write_run_weights(run, tmp)
    if run.is_main:
        save_config(run.cfg, tmp / RECIPE_FILE)
    acc.wait_for_everyone()
    if run.is_main:
        commit(tmp, final)
    acc.wait_for_everyone()
    return final


def read_position(folder: Path) -> dict[str, Any]:
    """What ``training_state.json`` of a checkpoint says (train.run.Position's fields)."""
    return read_json(Path(folder) / POSITION_FILE)


# ----------------------------------------------------------------------------------------------------------------
# reading a checkpoint (export, sample --lora)


@dataclass
class Checkpoint:
    """One checkpoint folder of a run (``final/`` or ``checkpoints/checkpoint-N``) and what it says about itself."""

    folder: Path
    meta: dict[str, Any]
    config_path: Optional[Path]  # <run>/config.yaml when present

    @property
    def family(self) -> str:
        return str(self.meta["family"])

    @property
    def mode(self) -> str:
        return str(self.meta["mode"])

    @property
    def lora_path(self) -> Path:
        return self.folder / "weights" / "lora.safetensors"

    @property
    def transformer_path(self) -> Path:
        return self.folder / "weights" / "transformer"


def resolve_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """A run folder (-> final/ if present, else the newest checkpoint) or a checkpoint folder."""
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"--checkpoint: {root} does not exist")
    if (root / META_FILE).is_file():
        folder = root
    elif (root / "final" / META_FILE).is_file():
        folder = root / "final"
    else:
        found = [c for c in list_checkpoints(root) if (c / META_FILE).is_file()]
        if not found:
            raise ValueError(
                f"--checkpoint: {root} holds no checkpoint (expected meta.json, final/meta.json or "
                "checkpoints/checkpoint-<step>/meta.json)"
            )
        folder = found[-1]
    try:
        meta = json.loads((folder / META_FILE).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"--checkpoint: {folder / 'meta.json'} is not valid JSON ({err.msg} at line {err.lineno})") from None
    _check_meta(meta, folder)
    run_dir = folder.parent if folder.name == "final" else folder.parent.parent
    config = run_dir / RECIPE_FILE
    ckpt = Checkpoint(folder=folder, meta=meta, config_path=config if config.is_file() else None)
    if ckpt.mode == "lora" and not ckpt.lora_path.is_file():
        raise FileNotFoundError(f"--checkpoint: {ckpt.lora_path} is missing (meta.json says mode=lora)")
    if ckpt.mode == "full" and not (ckpt.transformer_path / "config.json").is_file():
        raise FileNotFoundError(f"--checkpoint: {ckpt.transformer_path}/config.json is missing (meta.json says mode=full)")
    return ckpt


def _check_meta(meta: Any, folder: Path) -> None:
    where = folder / META_FILE
    if not isinstance(meta, dict):
        raise ValueError(f"{where}: expected a JSON object")
    for key in ("family", "mode", "pretrained"):
        if key not in meta:
            raise ValueError(f"{where}: missing key '{key}'")
    if meta["family"] not in ADAPTERS:
        raise ValueError(f"{where}: family: expected one of {', '.join(ADAPTERS)}; got {meta['family']!r}")
    if meta["mode"] not in ("lora", "full"):
        raise ValueError(f"{where}: mode: expected lora or full; got {meta['mode']!r}")
    if meta["mode"] == "lora":
        lora = meta.get("lora")
        if not isinstance(lora, dict) or "rank" not in lora or "alpha" not in lora:
            raise ValueError(f"{where}: lora: expected an object with rank, alpha and target_modules")


def load_lora_state(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    """The peft state dict of the checkpoint (fp32), checked to hold only complete lora_A/lora_B pairs."""
    from safetensors.torch import load_file

    try:
        state = load_file(str(ckpt.lora_path))
    except Exception as err:  # noqa: BLE001 - safetensors has its own error type for a damaged/truncated file
        raise ValueError(f"{ckpt.lora_path} is damaged ({str(err).splitlines()[0][:200]}); use another checkpoint") from None
    check_lora_state(state, rank=int(ckpt.meta["lora"]["rank"]), source=str(ckpt.lora_path))
    return state


def check_lora_state(state: Mapping[str, torch.Tensor], *, rank: Optional[int] = None, source: str = "LoRA state") -> list[str]:
    """Module names of a peft LoRA state dict; raises on keys that are not plain LoRA pairs."""
    if not state:
        raise ValueError(f"{source}: holds no LoRA tensors")
    halves: dict[str, set[str]] = {}
    for key, value in state.items():
        m = LORA_KEY.match(key)
        if m is None:
            raise ValueError(
                f"{source}: unsupported key {key!r} (expected <module>.lora_A.weight / <module>.lora_B.weight; "
                "DoRA, LoRA bias and adapter-named keys are not exported)"
            )
        halves.setdefault(m["module"], set()).add(m["ab"])
        if value.ndim != 2:
            raise ValueError(f"{source}: {key} has shape {tuple(value.shape)}; expected a 2-D LoRA factor")
        r = value.shape[0] if m["ab"] == "A" else value.shape[1]
        if rank is not None and r != rank:
            raise ValueError(f"{source}: {key} has rank {r}, but meta.json says lora.rank={rank}")
    for module, ab in halves.items():
        if ab != {"A", "B"}:
            raise ValueError(f"{source}: module {module!r} has lora_{''.join(sorted(ab))} only; both lora_A and lora_B are needed")
    return sorted(halves)
