"""The fit check: a lower bound on memory per GPU from the transformer config, before any weight is loaded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import HunyuanVideoTransformer3DModel, MochiTransformer3DModel, WanTransformer3DModel
from peft import LoraConfig

from train.errors import UserError
from train.memory_fit import GB, ParamCounts, bytes_per_gpu, check_fit, count_params
from train.models import get_adapter

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
H200 = 141 * 10**9
H100 = 80 * 10**9


@pytest.mark.parametrize("family", ["wan", "hunyuan_video", "mochi"])
def test_counts_equal_the_real_model_with_peft(family: str, tmp_path) -> None:
    adapter_cls = get_adapter(family)
    adapter = adapter_cls(adapter_cls.save_tiny_random(str(tmp_path / "tiny"), seed=0), dtype=torch.float32)
    model = adapter.load_transformer()
    cls = type(model)
    full = count_params(cls, dict(model.config), "full", 8, TARGETS)
    assert full.total == full.trainable == sum(p.numel() for p in model.parameters())
    lora = count_params(cls, dict(model.config), "lora", 8, adapter.default_lora_targets)
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=8, lora_alpha=8, target_modules=adapter.default_lora_targets))
    assert lora.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert lora.total == sum(p.numel() for p in model.parameters())


def test_bytes_per_mode_and_stage() -> None:
    c = ParamCounts(total=1_000, trainable=100)
    assert bytes_per_gpu(c, mode="lora", mixed_precision="bf16", zero_stage=0, world_size=4) == 900 * 2 + 100 * 16
    assert bytes_per_gpu(c, mode="lora", mixed_precision="no", zero_stage=0, world_size=1) == 900 * 4 + 100 * 16
    assert bytes_per_gpu(c, mode="lora", mixed_precision="bf16", zero_stage=2, world_size=4) == 900 * 2 + 100 * (4 + 3)
    assert bytes_per_gpu(c, mode="lora", mixed_precision="bf16", zero_stage=3, world_size=4) == (900 * 2 + 1600) / 4
    full = ParamCounts(total=1_000, trainable=1_000)
    assert bytes_per_gpu(full, mode="full", mixed_precision="bf16", zero_stage=3, world_size=8) == 16_000 / 8


@pytest.fixture(scope="module")
def wan14b() -> dict:  # WanTransformer3DModel's defaults are Wan2.1-14B's config (40 x 128 heads, 40 layers)
    return {"lora": count_params(WanTransformer3DModel, {}, "lora", 128, TARGETS),
            "full": count_params(WanTransformer3DModel, {}, "full", 128, TARGETS)}


def test_the_14b_recipe_fits_with_lora_on_one_gpu_and_full_only_sharded(wan14b: dict) -> None:
    assert 14.0e9 < wan14b["full"].total < 14.5e9
    need = check_fit(wan14b["lora"], mode="lora", mixed_precision="bf16", zero_stage=0, world_size=1, gpu_bytes=H200)
    assert 28 * GB < need < 40 * GB
    assert check_fit(wan14b["full"], mode="full", mixed_precision="bf16", zero_stage=3, world_size=8, gpu_bytes=H100)
    with pytest.raises(UserError) as err:
        check_fit(wan14b["full"], mode="full", mixed_precision="bf16", zero_stage=2, world_size=2, gpu_bytes=H200,
                  gpu_name="NVIDIA H200")
    msg = str(err.value)
    assert "\n" not in msg and "cannot fit" in msg and "ZeRO-2 over 2 GPUs" in msg and "NVIDIA H200" in msg
    assert "--zero 3" in msg and "train.mode=lora" in msg
    with pytest.raises(UserError, match="ZeRO-3 over 2 GPUs"):
        check_fit(wan14b["full"], mode="full", mixed_precision="bf16", zero_stage=3, world_size=2, gpu_bytes=H100)


@pytest.mark.parametrize("cls, low, high", [(HunyuanVideoTransformer3DModel, 12.5e9, 13.5e9), (MochiTransformer3DModel, 9.5e9, 10.5e9)])
def test_other_families_default_configs_are_their_real_sizes(cls: type, low: float, high: float) -> None:
    counts = count_params(cls, {}, "full", 128, TARGETS)
    assert low < counts.total < high
    with pytest.raises(UserError, match="cannot fit"):  # full fine-tuning of a 10B+ model on one GPU: never
        check_fit(counts, mode="full", mixed_precision="bf16", zero_stage=0, world_size=1, gpu_bytes=H200)


def test_trainer_hook_reads_the_model_config_and_the_launch(tmp_path, monkeypatch, capsys) -> None:
    """check_before_loading as the trainer calls it, with the CUDA device faked (a CPU machine has none):
    it needs only config.json, stops on a too-small GPU and prints the bound on one that fits."""
    from types import SimpleNamespace

    from train.config import load_config
    from train.memory_fit import check_before_loading

    model = get_adapter("wan").save_tiny_random(str(tmp_path / "tiny"), seed=0)
    for name in ("diffusion_pytorch_model.safetensors",):  # no weights are read
        for f in (tmp_path / "tiny" / "transformer").glob(name):
            f.unlink()
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml",
                      [f"model.pretrained={model}", "train.mode=full"])
    adapter = get_adapter("wan")(model, dtype=torch.float32)
    accel = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=None), num_processes=1, device=torch.device("cpu"),
                            is_main_process=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    props = SimpleNamespace(total_memory=10_000, name="Tiny GPU")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    with pytest.raises(UserError, match="cannot fit.*Tiny GPU"):
        check_before_loading(cfg, adapter, accel)
    props.total_memory = 10**12
    check_before_loading(cfg, adapter, accel)
    assert "memory: >= 0.0 GB per GPU for weights, gradients and optimizer states" in capsys.readouterr().out
