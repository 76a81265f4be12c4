"""Turn a training checkpoint into files that diffusers and ComfyUI load (and, optionally, push them to the Hub).

Output folder::

    pytorch_lora_weights.safetensors   diffusers LoRA: ``transformer.<module>.lora_A/B.weight`` and the peft
                                       LoraConfig JSON under the ``lora_adapter_metadata`` header entry
                                       (what ``<Pipeline>.save_lora_weights`` writes), so alpha != rank survives
    lora_comfyui.safetensors           ComfyUI LoRA: ``diffusion_model.<original module>.lora_A/B.weight`` with
                                       alpha/rank baked in (sqrt of the scale on each factor) and no ``.alpha``
                                       keys, so ComfyUI and diffusers' converters (which add no scale then) both
                                       reproduce the trained model; fused original projections (qkv) get a
                                       block-diagonal LoRA of rank n*r, which is exact
    transformer/                       --merge (or a full fine-tune): base + LoRA merged, diffusers layout,
                                       sharded safetensors
    README.md                          model card
    training_config.yaml               the resolved recipe of the run
    training_meta.json                 the checkpoint's meta.json (family, attention, frames, steps ...)

Everything is assembled in a hidden sibling folder and renamed into place at the end.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import torch
from torch import nn

from train.checkpointing import (  # noqa: F401 - re-exported: the export file names live with the checkpoint format
    COMFYUI_FILE,
    LORA_FILE,
    Checkpoint,
    check_lora_state,
    load_lora_state,
    resolve_checkpoint,
)
from train.models import get_adapter

LORA_FORMATS = ("diffusers", "comfyui")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# ----------------------------------------------------------------------------------------------------------------
# arguments


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"--dtype: expected one of {', '.join(DTYPES)}; got {name!r}")
    return DTYPES[name]


def parse_lora_formats(value: str | Sequence[str] | None) -> Optional[list[str]]:
    """``"diffusers,comfyui"`` / a list -> validated list; ``"none"`` -> []; None -> None (the default set)."""
    if value is None:
        return None
    items = [s.strip() for s in value.split(",")] if isinstance(value, str) else [str(s).strip() for s in value]
    items = [s for s in items if s]
    if items == ["none"]:
        return []
    bad = [s for s in items if s not in LORA_FORMATS]
    if bad or not items:
        raise ValueError(f"--lora-format: expected a comma-separated subset of {', '.join(LORA_FORMATS)} (or none); got {value!r}")
    return list(dict.fromkeys(items))


def peft_lora_config(lora_meta: Mapping[str, Any]) -> Any:
    """The peft LoraConfig the trainer used (same arguments as ``transformer.add_adapter`` in the trainer)."""
    from peft import LoraConfig

    return LoraConfig(
        r=int(lora_meta["rank"]),
        lora_alpha=float(lora_meta["alpha"]),
        lora_dropout=float(lora_meta.get("dropout", 0.0)),
        target_modules=list(lora_meta.get("target_modules") or []),
        init_lora_weights=True,
    )


# ----------------------------------------------------------------------------------------------------------------
# diffusers LoRA


def diffusers_lora_state(state: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """peft keys -> the keys ``load_lora_weights`` expects: ``transformer.`` + the diffusers module name."""
    return {f"transformer.{k}": v.detach().to("cpu", dtype, copy=True).contiguous() for k, v in state.items()}


def write_diffusers_lora(
    out_dir: Path, family: str, state: Mapping[str, torch.Tensor], lora_meta: Mapping[str, Any], dtype: torch.dtype
) -> Path:
    """Write through the family pipeline's own ``save_lora_weights`` so the file is exactly what diffusers writes."""
    import diffusers

    pipeline_cls = getattr(diffusers, get_adapter(family).pipeline_class)
    layers = {k: v.detach().to("cpu", dtype, copy=True).contiguous() for k, v in state.items()}
    pipeline_cls.save_lora_weights(
        str(out_dir),
        transformer_lora_layers=layers,
        transformer_lora_adapter_metadata=peft_lora_config(lora_meta).to_dict(),
        weight_name=LORA_FILE,
        safe_serialization=True,
    )
    return out_dir / LORA_FILE


# ----------------------------------------------------------------------------------------------------------------
# ComfyUI LoRA


def _qkv_rank(module: str) -> int:
    """Position of a projection inside a fused original weight: q, k, v, then the rest (e.g. the MLP of linear1)."""
    leaf = module.rsplit(".", 1)[-1]
    for pos, names in enumerate((("to_q", "add_q_proj"), ("to_k", "add_k_proj"), ("to_v", "add_v_proj"))):
        if leaf in names:
            return pos
    return 3


@dataclass
class ComfyGroup:
    """One original (ComfyUI) module and the diffusers modules whose weights it concatenates along the output axis."""

    name: str
    members: list[str] = field(default_factory=list)


def comfyui_groups(
    trained: Iterable[str], comfyui_key: Callable[[str], Optional[str]], all_linear: Optional[Mapping[str, int]] = None
) -> dict[str, ComfyGroup]:
    """Group trained diffusers modules by original name; ``all_linear`` (module -> out features of the base
    transformer) adds untrained siblings of fused weights, which get zero rows."""
    trained = list(trained)
    missing = [m for m in trained if comfyui_key(m) is None]
    if missing:
        raise ValueError(f"ComfyUI format: no original (ComfyUI) name for trained module(s) {', '.join(missing[:4])}"
                         f"{' ...' if len(missing) > 4 else ''}; export with --lora-format diffusers")
    groups: dict[str, ComfyGroup] = {}
    for m in trained:
        key = comfyui_key(m)
        groups.setdefault(key, ComfyGroup(key)).members.append(m)  # type: ignore[arg-type]
    if all_linear is not None:
        for m in all_linear:
            key = comfyui_key(m)
            if key in groups and m not in groups[key].members:
                groups[key].members.append(m)
    order = {m: i for i, m in enumerate(all_linear or trained)}
    for g in groups.values():
        g.members.sort(key=lambda m: (_qkv_rank(m), order.get(m, 0)))
    return groups


def comfyui_lora_state(
    state: Mapping[str, torch.Tensor],
    *,
    alpha: float,
    comfyui_key: Callable[[str], Optional[str]],
    dtype: torch.dtype,
    all_linear: Optional[Mapping[str, int]] = None,
) -> dict[str, torch.Tensor]:
    """``diffusion_model.<original>.lora_A/B.weight`` with the scale baked in: B' A' = (alpha/rank) B A per module.

    Baking (rather than ``.alpha`` keys) is what loads everywhere: ComfyUI uses scale 1 without ``.alpha``, and
    diffusers' HunyuanVideo converter cannot carry ``.alpha`` keys. A fused original weight (e.g. HunyuanVideo
    ``img_attn_qkv``) gets A = [A_q; A_k; A_v] and a block-diagonal B (rank n*r); untrained parts get zero rows.
    """
    modules = check_lora_state(state)
    groups = comfyui_groups(modules, comfyui_key, all_linear)
    out: dict[str, torch.Tensor] = {}
    for name, group in sorted(groups.items()):
        a_parts: list[Optional[torch.Tensor]] = []
        b_parts: list[tuple[str, Optional[torch.Tensor]]] = []
        rank = 0
        for m in group.members:
            if f"{m}.lora_A.weight" in state:
                a, b = state[f"{m}.lora_A.weight"].double(), state[f"{m}.lora_B.weight"].double()
                rank = a.shape[0]
                a_parts.append(a)
                b_parts.append((m, b))
            else:
                a_parts.append(None)
                b_parts.append((m, None))
        if len(group.members) == 1:
            a_full, b_full = a_parts[0], b_parts[0][1]
        else:
            in_features = {a.shape[1] for a in a_parts if a is not None}
            if len(in_features) != 1:
                raise ValueError(f"ComfyUI format: modules {group.members} fused into {name!r} have different input sizes")
            n_in = in_features.pop()
            a_full = torch.cat([a if a is not None else torch.zeros(rank, n_in, dtype=torch.float64) for a in a_parts], dim=0)
            rows = []
            for i, (m, b) in enumerate(b_parts):
                if b is None:
                    if all_linear is None or m not in all_linear:
                        raise ValueError(f"ComfyUI format: output size of untrained module {m!r} (part of {name!r}) unknown")
                    b = torch.zeros(all_linear[m], rank, dtype=torch.float64)
                block = torch.zeros(b.shape[0], rank * len(group.members), dtype=torch.float64)
                block[:, i * rank : (i + 1) * rank] = b
                rows.append(block)
            b_full = torch.cat(rows, dim=0)
        root = math.sqrt(float(alpha) / rank)  # the same factor on both: neither gets extreme in bf16
        out[f"diffusion_model.{name}.lora_A.weight"] = (a_full * root).to(dtype).contiguous()
        out[f"diffusion_model.{name}.lora_B.weight"] = (b_full * root).to(dtype).contiguous()
    return out


def linear_out_features(family: str, pretrained: str, revision: Optional[str] = None) -> Optional[dict[str, int]]:
    """Output sizes of every nn.Linear of the base transformer, from its config alone (no weights are read).

    None when the config can't be found (offline and not cached); fused ComfyUI weights then need every part trained.
    """
    import diffusers
    from accelerate import init_empty_weights

    cls = getattr(diffusers, get_adapter(family).transformer_class)
    try:
        config = cls.load_config(pretrained, subfolder="transformer", revision=revision)
    except Exception:  # noqa: BLE001 - offline / not cached: the caller degrades gracefully
        return None
    with init_empty_weights():
        skeleton = cls.from_config(config)
    return {n: m.out_features for n, m in skeleton.named_modules() if isinstance(m, nn.Linear)}


def write_comfyui_lora(
    out_dir: Path,
    state: Mapping[str, torch.Tensor],
    lora_meta: Mapping[str, Any],
    adapter: Any,
    dtype: torch.dtype,
    all_linear: Optional[Mapping[str, int]] = None,
) -> Path:
    from safetensors.torch import save_file

    tensors = comfyui_lora_state(
        state, alpha=float(lora_meta["alpha"]), comfyui_key=adapter.comfyui_key, dtype=dtype, all_linear=all_linear
    )
    # No lora_adapter_metadata here: the scale is baked in, and diffusers would apply alpha/rank again.
    meta = {"format": "pt", "base_model": str(adapter.pretrained), "trained_rank": str(lora_meta["rank"]),
            "trained_alpha": str(lora_meta["alpha"]), "alpha_baked_in": "true"}
    path = out_dir / COMFYUI_FILE
    save_file(tensors, str(path), metadata=meta)
    return path


def _comfyui_unavailable(adapter: Any, modules: Iterable[str]) -> Optional[str]:
    """Why no ComfyUI file can be written (None when it can): a partial file would not reproduce the model."""
    missing = [m for m in modules if adapter.comfyui_key(m) is None]
    if not missing:
        return None
    return (f"{adapter.family} has no original (ComfyUI) name for {len(missing)} trained module(s), e.g. "
            f"{missing[0]!r}; use the diffusers file")


# ----------------------------------------------------------------------------------------------------------------
# merged / full transformer


def merge_lora(transformer: nn.Module, state: Mapping[str, torch.Tensor], lora_meta: Mapping[str, Any]) -> nn.Module:
    """Load the LoRA through diffusers' own ``load_lora_adapter`` and fuse it (peft ``merge``) in fp32; the merged
    modules return to the dtype the base was loaded in."""
    modules = check_lora_state(state)
    dtypes = {}
    for name in modules:  # merge in fp32 even when the base is stored in bf16
        sub = transformer.get_submodule(name)
        dtypes[name] = next(sub.parameters()).dtype
        sub.to(torch.float32)
    transformer.load_lora_adapter(
        diffusers_lora_state(state, torch.float32),
        prefix="transformer",
        adapter_name="export",
        metadata={f"transformer.{k}": v for k, v in peft_lora_config(lora_meta).to_dict().items()},
    )
    transformer.fuse_lora(lora_scale=1.0, adapter_names=["export"])
    transformer.unload_lora()
    left = [n for n, _ in transformer.named_parameters() if "lora_" in n]
    if left:
        raise RuntimeError(f"merge left LoRA parameters behind: {left[:3]}")
    for name, original in dtypes.items():  # back to the dtype the base was loaded in (keep-in-fp32 modules untouched)
        transformer.get_submodule(name).to(original)
    return transformer


def load_full_transformer(ckpt: Checkpoint, dtype: torch.dtype) -> nn.Module:
    import diffusers

    cls_name = json.loads((ckpt.transformer_path / "config.json").read_text()).get("_class_name") or get_adapter(ckpt.family).transformer_class
    cls = getattr(diffusers, cls_name)
    return cls.from_pretrained(str(ckpt.transformer_path), dtype=dtype)


# ----------------------------------------------------------------------------------------------------------------
# the whole export


@dataclass
class ExportResult:
    output: Path
    files: list[str]
    hub_url: Optional[str] = None
    notes: list[str] = field(default_factory=list)


def _check_output(output: Path, force: bool) -> None:
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output: {output} exists and is not a folder")
    if output.is_dir() and any(output.iterdir()) and not force:
        raise ValueError(f"--output: {output} is not empty; pass --force to replace it")


def _check_not_inside_run(output: Path, ckpt: "Checkpoint") -> None:
    """--force replaces --output: never when that would delete the checkpoint or run folder being exported."""
    out = output.resolve()
    run = ckpt.config_path.parent if ckpt.config_path is not None else ckpt.folder.parent
    for protected in (ckpt.folder.resolve(), run.resolve()):
        if out == protected or out in protected.parents:
            raise ValueError(f"--output: {output} would replace the run being exported ({protected}); choose another folder")


def _readable_files(folder: Path) -> None:
    """safetensors writes through a private temp file (mode 0600); exports are meant to be shared: use the umask."""
    umask = os.umask(0)
    os.umask(umask)
    for p in folder.rglob("*"):
        if p.is_file():
            p.chmod(0o666 & ~umask)


def _replace_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        old = final.parent / f".old-{final.name}-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)


def export_checkpoint(
    checkpoint: str | os.PathLike,
    output: str | os.PathLike,
    *,
    merge: bool = False,
    lora_formats: str | Sequence[str] | None = None,
    dtype: str = "bf16",
    force: bool = False,
    push_to_hub: Optional[str] = None,
    private: bool = False,
    hub_api: Any = None,
    max_shard_size: str | int = "5GB",
    log: Callable[[str], None] = print,
) -> ExportResult:
    """Export a run / checkpoint folder to ``output`` (see the module docstring); returns what was written.

    ``lora_formats``: None means both. The ComfyUI file is written where the family has original names for
    every trained module (and the base config gives the fused layouts); otherwise it is skipped with a note
    (``ExportResult.notes``), since a partial file would not reproduce the trained model.
    """
    torch_dtype = parse_dtype(dtype)
    formats = parse_lora_formats(lora_formats)
    if push_to_hub is not None:
        from train.hub import check_repo_id

        check_repo_id(push_to_hub)
    output = Path(output)
    _check_output(output, force)
    ckpt = resolve_checkpoint(checkpoint)
    _check_not_inside_run(output, ckpt)
    if ckpt.mode == "lora" and formats == [] and not merge:
        raise ValueError("--lora-format none without --merge leaves nothing to export")
    from train.model_card import model_card

    adapter = get_adapter(ckpt.family)(str(ckpt.meta["pretrained"]), ckpt.meta.get("revision"), torch_dtype)
    notes: list[str] = []
    log(f"exporting {ckpt.folder} ({ckpt.family}, {ckpt.mode}, step {ckpt.meta.get('step')}) -> {output}")

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".tmp-export-{output.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    written = {"diffusers": False, "comfyui": False, "transformer": False}
    try:
        if ckpt.mode == "lora":
            state = load_lora_state(ckpt)
            lora_meta = ckpt.meta["lora"]
            modules = check_lora_state(state)
            if formats is None:
                formats = list(LORA_FORMATS)
            if "diffusers" in formats:
                write_diffusers_lora(tmp, ckpt.family, state, lora_meta, torch_dtype)
                written["diffusers"] = True
            if "comfyui" in formats:
                skip = _comfyui_unavailable(adapter, modules)
                all_linear = None
                if skip is None and adapter.comfyui_fuses:  # only fused original weights need the base layout
                    all_linear = linear_out_features(ckpt.family, str(ckpt.meta["pretrained"]), ckpt.meta.get("revision"))
                    if all_linear is None:
                        skip = (f"the base transformer config of {ckpt.meta['pretrained']!r} cannot be read (offline?), "
                                "and the ComfyUI layout of fused weights needs it")
                if skip is None:
                    write_comfyui_lora(tmp, state, lora_meta, adapter, torch_dtype, all_linear)
                    written["comfyui"] = True
                else:
                    notes.append(f"ComfyUI LoRA skipped: {skip}")
            if merge:
                log(f"merging the LoRA into {ckpt.meta['pretrained']} ...")
                transformer = merge_lora(adapter.load_transformer(), state, lora_meta)
                transformer.save_pretrained(str(tmp / "transformer"), safe_serialization=True, max_shard_size=max_shard_size)
                written["transformer"] = True
                del transformer
        else:
            if formats:
                notes.append("a full fine-tune has no LoRA; --lora-format ignored")
            transformer = load_full_transformer(ckpt, torch_dtype)
            transformer.save_pretrained(str(tmp / "transformer"), safe_serialization=True, max_shard_size=max_shard_size)
            written["transformer"] = True
            del transformer
        if not any(written.values()):
            raise ValueError("nothing to export: " + ("; ".join(notes) or "no weights were written")
                             + " (ask for --lora-format diffusers, or --merge)")
        if ckpt.config_path is not None:
            shutil.copyfile(ckpt.config_path, tmp / "training_config.yaml")
        else:
            notes.append("no config.yaml beside the checkpoint: training_config.yaml not written")
        (tmp / "training_meta.json").write_text(json.dumps(ckpt.meta, indent=2, sort_keys=True))
        (tmp / "README.md").write_text(model_card(ckpt, written, repo_id=push_to_hub, local=output))
        _readable_files(tmp)
        if not force:
            _check_output(output, force)  # someone may have filled it meanwhile
        _replace_dir(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = sorted(str(p.relative_to(output)) for p in output.rglob("*") if p.is_file())
    result = ExportResult(output=output, files=files, notes=notes)
    for note in notes:
        log(f"note: {note}")
    log("wrote " + ", ".join(files))
    if push_to_hub:
        from train.hub import HubError, push_folder

        try:
            result.hub_url = push_folder(output, push_to_hub, private=private, api=hub_api)
        except HubError as err:
            raise HubError(f"{err} (the export itself is complete in {output})") from None
        log(f"pushed to {result.hub_url}")
    return result
