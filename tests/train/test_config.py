"""Recipe loading: YAML + overrides -> typed objects; every problem names the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from train.config import ConfigError, load_config, save_config
from train.config_schema import RecipeConfig

ROOT = Path(__file__).resolve().parents[2]
BASE = ["model.pretrained=some/model", "data.path=videos"]


def test_all_recipes_load() -> None:
    recipes = sorted((ROOT / "configs").glob("*.yaml"))
    assert len(recipes) >= 10
    for path in recipes:
        cfg = load_config(path)
        assert isinstance(cfg, RecipeConfig)
        assert cfg.model.pretrained, path


def test_overrides_are_typed() -> None:
    cfg = load_config(None, BASE + ["train.max_steps=7", "attention.type=svg2", "attention.top_p=0.5",
                                    "data.buckets=[[33, 64, 64]]", "train.resume_from=latest", "lora.alpha=4"])
    assert cfg.train.max_steps == 7 and cfg.attention.type == "svg2" and cfg.attention.top_p == 0.5
    assert cfg.data.buckets == [[33, 64, 64]] and cfg.train.resume_from == "latest"
    assert cfg.lora.alpha == 4.0 and isinstance(cfg.lora.alpha, float)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.max_step=3", "unknown key 'train.max_step'; did you mean 'train.max_steps'?"),
        ("trian.seed=1", "unknown key 'trian'; did you mean 'train'?"),
        ("attention.type=radail", "did you mean 'radial'?"),
        ("train.max_steps=abc", "train.max_steps: expected an integer, got 'abc'"),
        ("train.gradient_checkpointing=3", "train.gradient_checkpointing: expected true or false"),
        ("attention.top_p=1.5", "attention.top_p: expected a value in (0, 1]"),
        ("train.max_grad_norm=0", "train.max_grad_norm: expected a positive finite number"),
        ("train.learning_rate=.nan", "train.learning_rate: expected a positive finite number"),
        ("data.buckets=[[1, 2]]", "data.buckets[0]: expected [frames, height, width]"),
        ("train.resume_from=/no/such/dir", "train.resume_from"),
        ("nonsense", "expected the form section.key=value"),
    ],
)
def test_bad_overrides_name_the_key(override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, BASE + [override])
    assert expected in str(err.value)


def test_missing_required_value() -> None:
    with pytest.raises(ConfigError, match="missing required value model.pretrained"):
        load_config(None, ["data.path=x"])


def test_malformed_and_missing_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {family: wan\ntrain: [")
    with pytest.raises(ConfigError, match="malformed YAML at line"):
        load_config(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_saved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", ["train.max_steps=3"])
    out = tmp_path / "run" / "config.yaml"
    save_config(cfg, out)
    assert load_config(out) == cfg
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp file left behind
    assert yaml.safe_load(out.read_text())["train"]["max_steps"] == 3


@pytest.mark.parametrize("args, message", [
    (["--config", "missing.yaml"], "error: config file not found: missing.yaml"),
    (["--config", "configs/quickstart.yaml", "train.max_stepz=3"], "error: unknown key 'train.max_stepz'"),
    (["--config", "configs/quickstart.yaml", "train.max_steps=x"], "error: train.max_steps: expected an integer"),
])
def test_entry_point_prints_one_line(args: list[str], message: str) -> None:
    proc = subprocess.run([sys.executable, "train/finetune.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith(message), proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
