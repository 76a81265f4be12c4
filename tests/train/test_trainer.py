"""The fine-tuning loop end to end on tiny random-weight models of every family (CPU)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from data.synthetic import write_synthetic_dataset
from train.config import load_config
from train.errors import UserError
from train.models import get_adapter
from train.trainer import train

from models_helpers import fresh_accelerate_state  # noqa: F401 (autouse fixture)

# (family, frames of the form k*multiple+1, size) small enough for a CPU step in well under a second
FAMILIES = {"wan": (9, 32), "hunyuan_video": (9, 32), "mochi": (7, 32)}


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """A tiny random pipeline and a synthetic video set per family."""
    root = tmp_path_factory.mktemp("trainer_assets")
    out = {}
    for family, (frames, size) in FAMILIES.items():
        model = Path(get_adapter(family).save_tiny_random(str(root / f"model-{family}"), seed=0))
        data = write_synthetic_dataset(root / f"data-{family}", num_videos=3, frames=frames + 4, height=size, width=size, fps=16)
        out[family] = (model, data)
    return out


def recipe(tmp: Path, family: str, assets: dict, *extra: str):
    frames, size = FAMILIES[family]
    model, data = assets[family]
    return load_config(
        None,
        [
            f"model.family={family}",
            f"model.pretrained={model}",
            f"data.path={data}",
            f"data.frames={frames}",
            f"data.height={size}",
            f"data.width={size}",
            "data.fps=16",
            "data.num_workers=0",
            f"train.output_dir={tmp / 'run'}",
            "train.max_steps=2",
            "train.learning_rate=1e-3",
            "train.mixed_precision=no",
            "train.checkpoint_every=1000",
            "attention.block_size=16",
            "attention.backend=torch",
            "attention.num_q_clusters=4",
            "attention.num_k_clusters=8",
            "lora.rank=4",
            "lora.alpha=4",
            "tracking.report_to=none",
            *extra,
        ],
    )


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("attention", ["dense", "radial", "svg2"])
def test_lora_two_steps(tmp_path: Path, assets: dict, family: str, attention: str) -> None:
    result = train(recipe(tmp_path, family, assets, f"attention.type={attention}"))
    assert len(result.losses) == 2 and all(math.isfinite(x) for x in result.losses)
    lora = result.final_dir / "weights" / "lora.safetensors"
    assert lora.is_file() and (result.final_dir / "meta.json").is_file()
    from safetensors.torch import load_file

    state = load_file(str(lora))
    assert state and any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in state.items())  # it learned


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_full_finetune_two_steps(tmp_path: Path, assets: dict, family: str) -> None:
    result = train(recipe(tmp_path, family, assets, "train.mode=full", "attention.type=radial"))
    assert len(result.losses) == 2 and all(math.isfinite(x) for x in result.losses)
    folder = result.final_dir / "weights" / "transformer"
    assert (folder / "config.json").is_file()
    cls = type(get_adapter(family)(str(assets[family][0]), dtype=torch.float32).load_transformer())
    cls.from_pretrained(str(folder))  # loads as the family's diffusers class


def test_all_true_radial_mask_gives_the_dense_loss(tmp_path: Path, assets: dict) -> None:
    # 3 latent frames x 16 tokens = 48 tokens in one 64-token block: the tail rule makes the mask all True
    dense = train(recipe(tmp_path / "d", "wan", assets, "attention.type=dense"))
    radial = train(recipe(tmp_path / "r", "wan", assets, "attention.type=radial", "attention.block_size=64"))
    assert radial.losses == pytest.approx(dense.losses, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("attention", ["radial", "svg2"])  # svg2: its warm-start centroids travel with the checkpoint
def test_resume_equals_uninterrupted(tmp_path: Path, assets: dict, attention: str) -> None:
    common = [f"attention.type={attention}", "train.max_steps=4", "train.gradient_accumulation_steps=2", "data.shuffle=true",
              "attention.kmeans_iters=1"]
    straight = train(recipe(tmp_path / "a", "wan", assets, *common))
    first = train(recipe(tmp_path / "b", "wan", assets, *common[:1], "train.max_steps=2", *common[2:], "train.checkpoint_every=2"))
    assert first.losses == pytest.approx(straight.losses[:2], rel=1e-6)
    # a checkpoint at step 2 is written only when training continues past it: train to 3 with a save at 2
    partial = train(recipe(tmp_path / "c", "wan", assets, *common, "train.max_steps=3", "train.checkpoint_every=2"))
    ckpts = sorted((tmp_path / "c" / "run" / "checkpoints").iterdir())
    assert [p.name for p in ckpts] == ["checkpoint-000002"]
    assert not [p for p in (tmp_path / "c" / "run" / "checkpoints").iterdir() if p.name.startswith(".")]
    resumed = train(recipe(tmp_path / "c", "wan", assets, *common, "train.resume_from=latest"))
    assert partial.losses[:2] == pytest.approx(straight.losses[:2], rel=1e-6)
    assert resumed.losses == pytest.approx(straight.losses[2:], rel=1e-5)


def test_ema_trains_saves_and_resumes(tmp_path: Path, assets: dict) -> None:
    ema = ["train.ema.enabled=true", "train.ema.decay=0.5", "train.max_steps=3", "train.checkpoint_every=2"]
    result = train(recipe(tmp_path, "wan", assets, *ema))
    from safetensors.torch import load_file

    exported = load_file(str(result.final_dir / "weights" / "lora.safetensors"))
    assert exported and all(torch.isfinite(v).all() for v in exported.values())
    resumed = train(recipe(tmp_path, "wan", assets, *ema, "train.max_steps=4", "train.resume_from=latest"))
    assert len(resumed.losses) == 2 and all(math.isfinite(x) for x in resumed.losses)


def test_reused_output_dir_needs_resume_or_overwrite(tmp_path: Path, assets: dict) -> None:
    train(recipe(tmp_path, "wan", assets, "train.max_steps=1"))
    with pytest.raises(UserError, match="holds checkpoints or final weights of an earlier run"):
        train(recipe(tmp_path, "wan", assets, "train.max_steps=1"))
    again = train(recipe(tmp_path, "wan", assets, "train.max_steps=1", "train.overwrite_output_dir=true"))
    assert len(again.losses) == 1


def test_nan_losses_are_skipped_counted_and_stop(tmp_path: Path, assets: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    adapter_cls = get_adapter("wan")
    real_predict = adapter_cls.predict

    def nan_predict(self, *args, **kwargs):
        return real_predict(self, *args, **kwargs) * float("nan")

    monkeypatch.setattr(adapter_cls, "predict", nan_predict)  # test-side fault injection
    with pytest.raises(UserError, match="3 steps in a row had a NaN/inf loss"):
        train(recipe(tmp_path, "wan", assets, "train.max_steps=5", "train.max_bad_steps_in_a_row=3"))


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.frames=8", "frames"),
        ("data.height=30", "height"),
    ],
)
def test_bad_shapes_fail_clearly(tmp_path: Path, assets: dict, override: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        train(recipe(tmp_path, "wan", assets, override))
    assert not (tmp_path / "run" / "final").exists()


def test_missing_model_and_other_family(tmp_path: Path, assets: dict) -> None:
    with pytest.raises((ValueError, FileNotFoundError, OSError)):
        train(recipe(tmp_path, "wan", assets, f"model.pretrained={tmp_path / 'nope'}"))
    with pytest.raises(ValueError, match="(?i)wan|family"):
        train(recipe(tmp_path / "x", "wan", assets, f"model.pretrained={assets['mochi'][0]}"))


def test_empty_dataset_after_filtering(tmp_path: Path, assets: dict) -> None:
    with pytest.raises(UserError, match="empty after filtering"):
        train(recipe(tmp_path, "wan", assets, "data.frames=201"))  # every synthetic video is too short


def test_wandb_offline_logs_the_run(tmp_path: Path, assets: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    result = train(recipe(tmp_path, "wan", assets, "tracking.report_to=wandb", "attention.type=radial"))
    runs = list((result.run_dir / "wandb").glob("offline-run-*"))
    assert runs and list(runs[0].glob("*.wandb"))


def test_hooks_follow_the_recipe_in_calling_order(tmp_path: Path, assets: dict) -> None:
    """Cheap (no model): which hooks a recipe gets, and their order (EMA before bad-step handling, so a skipped step
    moves no average; validation after the step's checkpoint; export last)."""
    from train.hooks import Hook, default_hooks
    from train.hooks.bad_steps import BadSteps
    from train.hooks.ema import EMA
    from train.hooks.export import ExportAtEnd
    from train.hooks.validation import Validation

    plain = default_hooks(recipe(tmp_path, "wan", assets))
    assert [type(h) for h in plain.hooks] == [BadSteps]
    everything = default_hooks(recipe(tmp_path, "wan", assets, "train.ema.enabled=true", "validation.every_steps=2",
                                      "validation.prompts=[a red circle]", "export.at_end=true"))
    assert [type(h) for h in everything.hooks] == [EMA, BadSteps, Validation, ExportAtEnd]
    points = [name for name in vars(Hook) if name.startswith("on_")]
    assert points == ["on_loaded", "on_prepared", "on_resumed", "on_optimizer_step", "on_step_end", "on_save_weights",
                      "on_train_end"]
    assert all(name in vars(type(everything)) for name in points)  # Hooks dispatches every point
