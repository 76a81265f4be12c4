"""Fill the DeepSpeed config values that accelerate cannot fill for a diffusers video transformer.

The shipped JSONs (configs/deepspeed/zero{2,3}.json) say "auto" wherever the value follows from the recipe or the
model, so that one fact has one owner:

- precision (``bf16``/``fp16`` ``enabled``): filled by accelerate from the ``mixed_precision`` the trainer passes
  (the recipe's ``train.mixed_precision``);
- micro-batch and gradient clipping: from the recipe here (our data loader is sharded by hand, so accelerate
  cannot read the micro-batch from it, and an "auto" clip would mean 1.0 instead of ``train.max_grad_norm``);
- the ZeRO-3 bucket sizes: accelerate derives them from ``model.config.hidden_size``, which diffusers
  transformers do not have, and stops. They are filled here from the transformer's width (heads x head_dim)
  and from the size of its largest block, the unit DeepSpeed gathers in turn while a DiT runs.

Values a user wrote as numbers are never changed. The plugin's ``deepspeed_config`` dict is accelerate's own
extension point for this (it is read again in ``accelerator.prepare``).
"""

from __future__ import annotations

from typing import Any, Mapping, MutableMapping

from torch import nn

from train.errors import UserError

#: ZeRO keys that accelerate fills from ``hidden_size`` (absent from diffusers configs); filled here instead.
BUCKET_KEYS = ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold")


def transformer_width(config: Mapping[str, Any]) -> int:
    """The inner width of a diffusers video transformer: attention heads x head dimension (Wan, HunyuanVideo and
    Mochi all name them ``num_attention_heads`` / ``attention_head_dim``)."""
    heads, head_dim = config.get("num_attention_heads"), config.get("attention_head_dim")
    if not isinstance(heads, int) or not isinstance(head_dim, int) or heads < 1 or head_dim < 1:
        raise UserError(
            "cannot size the DeepSpeed buckets: the transformer config has no integer num_attention_heads / "
            f"attention_head_dim (got {heads!r} / {head_dim!r}); set reduce_bucket_size, "
            "stage3_prefetch_bucket_size and stage3_param_persistence_threshold to numbers in the DeepSpeed JSON"
        )
    return heads * head_dim


def largest_block_numel(model: nn.Module) -> int:
    """Parameters of the largest repeated block (an element of any ``nn.ModuleList``), 0 when there is none."""
    best = 0
    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            for block in module:
                best = max(best, sum(p.numel() for p in block.parameters()))
    return best


def bucket_sizes(width: int, block_numel: int) -> dict[str, int]:
    """ZeRO bucket sizes (in elements) for a transformer of inner width ``width`` whose largest block holds
    ``block_numel`` parameters.

    - ``reduce_bucket_size`` = width²: the size of one projection matrix (accelerate's rule for hidden_size);
    - ``stage3_prefetch_bucket_size`` = one whole block (at least 0.9·width², accelerate's rule), so that the
      next block's weights are gathered while the current one computes;
    - ``stage3_param_persistence_threshold`` = 10·width: norms, biases and modulation vectors stay whole on
      every rank instead of being gathered on each use.
    """
    return {
        "reduce_bucket_size": width * width,
        "stage3_prefetch_bucket_size": max(int(0.9 * width * width), block_numel),
        "stage3_param_persistence_threshold": 10 * width,
    }


def fill_auto_values(
    ds_config: MutableMapping[str, Any], transformer: nn.Module, *, micro_batch: int, max_grad_norm: float
) -> dict[str, Any]:
    """Fill, in place, the micro-batch, the gradient clipping and any "auto" ZeRO bucket size of ``ds_config``
    (accelerate's ``DeepSpeedPlugin.deepspeed_config``). Returns what was filled (for the log)."""
    filled: dict[str, Any] = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_clipping": max_grad_norm}
    ds_config.update(filled)
    zero = ds_config.get("zero_optimization")
    if isinstance(zero, MutableMapping):
        auto = [k for k in BUCKET_KEYS if zero.get(k) == "auto"]
        if auto:
            sizes = bucket_sizes(transformer_width(dict(transformer.config)), largest_block_numel(transformer))
            for key in auto:
                zero[key] = sizes[key]
                filled[f"zero_optimization.{key}"] = sizes[key]
    return filled
