"""The shipped DeepSpeed JSONs and what train/deepspeed_config.py fills into them for diffusers transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from train.deepspeed_config import BUCKET_KEYS, bucket_sizes, fill_auto_values, largest_block_numel, transformer_width
from train.errors import UserError
from train.models import get_adapter

ROOT = Path(__file__).resolve().parents[2]
FAMILIES = ("wan", "hunyuan_video", "mochi")


@pytest.fixture(scope="module", params=FAMILIES)
def tiny_transformer(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> torch.nn.Module:
    adapter_cls = get_adapter(request.param)
    folder = adapter_cls.save_tiny_random(str(tmp_path_factory.mktemp(request.param) / "tiny"), seed=0)
    return adapter_cls(folder, dtype=torch.float32).load_transformer()


def test_width_is_heads_times_head_dim_and_the_block_is_the_largest_repeated_module(tiny_transformer) -> None:
    cfg = tiny_transformer.config
    assert not hasattr(cfg, "hidden_size")  # why accelerate cannot fill the buckets itself
    assert transformer_width(dict(cfg)) == cfg.num_attention_heads * cfg.attention_head_dim
    blocks = [m for m in tiny_transformer.modules() if isinstance(m, torch.nn.ModuleList)]
    largest = max(sum(p.numel() for p in b.parameters()) for ml in blocks for b in ml)
    assert largest_block_numel(tiny_transformer) == largest > 0


def test_shipped_zero3_json_gets_every_auto_bucket_filled(tiny_transformer) -> None:
    ds = json.loads((ROOT / "configs/deepspeed/zero3.json").read_text())
    assert all(ds["zero_optimization"][k] == "auto" for k in BUCKET_KEYS)
    filled = fill_auto_values(ds, tiny_transformer, micro_batch=2, max_grad_norm=0.5)
    width = transformer_width(dict(tiny_transformer.config))
    expected = bucket_sizes(width, largest_block_numel(tiny_transformer))
    assert {k: ds["zero_optimization"][k] for k in BUCKET_KEYS} == expected
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_clipping"] == 0.5
    assert filled["zero_optimization.reduce_bucket_size"] == width * width
    assert expected["stage3_prefetch_bucket_size"] >= int(0.9 * width * width)
    assert expected["stage3_param_persistence_threshold"] == 10 * width


def test_numbers_a_user_wrote_are_kept(tiny_transformer) -> None:
    ds = json.loads((ROOT / "configs/deepspeed/zero2.json").read_text())
    fill_auto_values(ds, tiny_transformer, micro_batch=1, max_grad_norm=1.0)
    assert ds["zero_optimization"]["reduce_bucket_size"] == 5e8
    ds = {"zero_optimization": {"stage": 3, "reduce_bucket_size": 123, "stage3_prefetch_bucket_size": "auto"}}
    fill_auto_values(ds, tiny_transformer, micro_batch=1, max_grad_norm=1.0)
    assert ds["zero_optimization"]["reduce_bucket_size"] == 123
    assert isinstance(ds["zero_optimization"]["stage3_prefetch_bucket_size"], int)


def test_a_config_without_heads_is_refused_in_one_line() -> None:
    with pytest.raises(UserError, match="num_attention_heads.*DeepSpeed JSON"):
        transformer_width({"hidden_dim": 64})


def test_real_widths_of_the_recipe_families() -> None:
    # Wan2.1-1.3B, Wan2.1-14B, HunyuanVideo, Mochi 1 (their transformer/config.json on the Hub)
    assert transformer_width({"num_attention_heads": 12, "attention_head_dim": 128}) == 1536
    assert transformer_width({"num_attention_heads": 40, "attention_head_dim": 128}) == 5120
    assert transformer_width({"num_attention_heads": 24, "attention_head_dim": 128}) == 3072


@pytest.mark.parametrize("precision, bf16, fp16", [("bf16", True, False), ("fp16", False, True), ("no", False, False)])
@pytest.mark.parametrize("stage", [2, 3])
def test_precision_comes_from_the_recipe_through_accelerate(stage: int, precision: str, bf16: bool, fp16: bool) -> None:
    """The JSONs say "auto"; accelerate fills them from the mixed_precision the trainer passes (the recipe's)."""
    from accelerate.utils import DeepSpeedPlugin

    plugin = DeepSpeedPlugin(hf_ds_config=str(ROOT / f"configs/deepspeed/zero{stage}.json"))
    plugin.set_mixed_precision(precision)
    assert plugin.zero_stage == stage
    assert plugin.deepspeed_config["bf16"]["enabled"] is bf16 and plugin.deepspeed_config["fp16"]["enabled"] is fp16


@pytest.mark.parametrize("name", ["single_gpu", "multi_gpu", "deepspeed_zero2", "deepspeed_zero3"])
def test_accelerate_configs_state_no_precision(name: str) -> None:
    """accelerate refuses mixed_precision beside deepspeed_config_file; the recipe is the one source everywhere."""
    cfg = yaml.safe_load((ROOT / f"configs/accelerate/{name}.yaml").read_text())
    assert "mixed_precision" not in cfg
    if name.startswith("deepspeed"):
        assert (ROOT / cfg["deepspeed_config"]["deepspeed_config_file"]).is_file()
