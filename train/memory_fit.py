"""Does a recipe fit the GPUs it is launched on? A lower bound on memory per GPU, checked before weights load.

The estimate counts only what training must hold whatever the clip length: the transformer's weights, and for
the trainable parameters their fp32 copy, gradient and the two AdamW moments. Activations, the CUDA context,
communication buckets and the frozen encoders (absent with a latent cache) come on top, so a recipe that passes
may still run out of memory at long clips (the out-of-memory message then lists the options); one that fails
cannot run at all, and says so in one line instead of loading tens of GB first.

Bytes per parameter:

- frozen (LoRA base weights): 2 in bf16/fp16, 4 with ``train.mixed_precision=no``; sharded over the GPUs by ZeRO-3;
- trainable (LoRA factors, or every weight in full fine-tuning): 16 = 4 weight + 4 gradient + 8 AdamW moments
  (under DeepSpeed with bf16 the same 16: 2 bf16 weight + 2 bf16 gradient + 4 fp32 master + 8 moments).
  Without ZeRO all 16 on every GPU; ZeRO-2 shards gradient and moments (12 of 16); ZeRO-3 shards all 16.

Parameter counts come from the transformer's config, built on the meta device (no memory, no weights).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from torch import nn

from train.errors import UserError

GB = 1e9
TRAINABLE_BYTES = 16
#: Of the 16 trainable bytes, those ZeRO-2 shards (gradient + AdamW moments); ZeRO-3 shards all of them.
ZERO2_SHARDED_BYTES = 12


@dataclass(frozen=True)
class ParamCounts:
    total: int
    trainable: int


def count_params(transformer_class: type, config: Mapping[str, Any], mode: str, rank: int,
                 target_modules: Sequence[str]) -> ParamCounts:
    """Parameters of ``transformer_class(**config)`` (built on the meta device) and how many of them train:
    all in ``full`` mode, else the LoRA factors ``rank x (in + out)`` of every Linear that peft would target
    (a module name equal to a target or ending in ``.target``)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = transformer_class.from_config(dict(config))
    total = sum(p.numel() for p in model.parameters())
    if mode == "full":
        return ParamCounts(total, total)
    lora = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and any(name == t or name.endswith("." + t) for t in target_modules):
            lora += rank * (module.in_features + module.out_features)
    return ParamCounts(total + lora, lora)


def bytes_per_gpu(counts: ParamCounts, *, mode: str, mixed_precision: str, zero_stage: int, world_size: int) -> float:
    """The lower bound described in the module docstring, in bytes, for one of ``world_size`` GPUs."""
    frozen = counts.total - counts.trainable
    frozen_bytes = 4 if mixed_precision == "no" or mode == "full" else 2
    world = max(1, world_size)
    if zero_stage >= 3:
        return (frozen * frozen_bytes + counts.trainable * TRAINABLE_BYTES) / world
    if zero_stage == 2:
        kept = TRAINABLE_BYTES - ZERO2_SHARDED_BYTES
        return frozen * frozen_bytes + counts.trainable * (kept + ZERO2_SHARDED_BYTES / world)
    return frozen * frozen_bytes + counts.trainable * TRAINABLE_BYTES


def check_fit(counts: ParamCounts, *, mode: str, mixed_precision: str, zero_stage: int, world_size: int,
              gpu_bytes: int, gpu_name: str = "GPU") -> float:
    """Raise a one-line UserError when the lower bound exceeds the memory of one GPU; else return the bound."""
    need = bytes_per_gpu(counts, mode=mode, mixed_precision=mixed_precision, zero_stage=zero_stage,
                         world_size=world_size)
    if need <= gpu_bytes:
        return need
    how = f"ZeRO-{zero_stage}" if zero_stage else ("DDP" if world_size > 1 else "no ZeRO")
    options = []
    if zero_stage < 3:
        options.append("--zero 3")
    options.append("more GPUs (--gpus N / --nodes N)")
    if mode == "full":
        options.append("train.mode=lora")
    raise UserError(
        f"this recipe cannot fit: at least {need / GB:.1f} GB per GPU for the transformer's weights, gradients and "
        f"optimizer states alone ({counts.total / 1e9:.2f}B parameters, {counts.trainable / 1e6:.1f}M trainable, "
        f"train.mode={mode}, {how} over {world_size} GPU{'s' if world_size > 1 else ''}) > {gpu_bytes / GB:.1f} GB "
        f"on {gpu_name}; options: {', '.join(options)}"
    )


def check_before_loading(cfg: Any, adapter: Any, accelerator: Any) -> None:
    """The trainer's hook: on CUDA, stop with one line before any weight is loaded when the recipe cannot fit
    the GPUs it was launched on; on the main process, print the bound when it does. Nothing to compare on CPU."""
    import torch

    if not torch.cuda.is_available():
        return
    from train.models.common import diffusers_class

    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    zero = int(plugin.zero_stage) if plugin is not None else 0
    counts = count_params(diffusers_class(adapter.transformer_class), adapter._config("transformer"),
                          cfg.train.mode, cfg.lora.rank, list(cfg.lora.target_modules))
    props = torch.cuda.get_device_properties(accelerator.device)
    need = check_fit(counts, mode=cfg.train.mode, mixed_precision=cfg.train.mixed_precision, zero_stage=zero,
                     world_size=accelerator.num_processes, gpu_bytes=props.total_memory, gpu_name=props.name)
    if accelerator.is_main_process:
        print(f"memory: >= {need / GB:.1f} GB per GPU for weights, gradients and optimizer states "
              f"(of {props.total_memory / GB:.1f} GB; activations come on top)", flush=True)
