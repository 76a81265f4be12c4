"""What a hostile user found (issue 16), one test per finding, each written from the user's command.

Most tests call the real entry points' ``main`` through ``train.cli.run_main`` in-process (what
``python train/finetune.py ...`` runs, minus the interpreter start); the one about what ``accelerate launch``
shows runs it as a subprocess. Each asserts what the user sees (one ``error:`` line, exit code 2) and what is on
disk afterwards (nothing of theirs written over or deleted).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import yaml

from data.synthetic import write_synthetic_dataset
from train.cli import run_main
from train.models import get_adapter

from models_helpers import fresh_accelerate_state  # noqa: F401 (autouse fixture)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hostile_assets")
    model = Path(get_adapter("wan").save_tiny_random(str(root / "tiny-wan"), seed=0))
    data = write_synthetic_dataset(root / "data", num_videos=3, frames=13, height=32, width=32, fps=16)
    return {"model": model, "data": data, "root": root}


def recipe_file(tmp: Path, assets: dict, **sections: dict) -> Path:
    """A recipe YAML like the shipped ones, for the tiny model (sections override the base values)."""
    raw = {
        "model": {"family": "wan", "pretrained": str(assets["model"])},
        "data": {"path": str(assets["data"]), "frames": 9, "height": 32, "width": 32, "fps": 16, "num_workers": 0},
        "attention": {"type": "radial", "block_size": 16, "backend": "torch"},
        "lora": {"rank": 4, "alpha": 4},
        "train": {"output_dir": str(tmp / "run"), "max_steps": 2, "learning_rate": 1e-3, "mixed_precision": "no",
                  "checkpoint_every": 1000},
        "tracking": {"report_to": "none"},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    path = tmp / f"recipe-{len(list(tmp.glob('recipe-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def finetune(capsys: pytest.CaptureFixture[str], recipe: Path, *overrides: str) -> tuple[int, str, list[str]]:
    """``python train/finetune.py --config <recipe> <overrides>``: exit code, stdout, stderr lines."""
    from train import finetune as entry

    code = run_main(lambda: entry.main(["--config", str(recipe), *overrides]))
    out, err = capsys.readouterr()
    return code, out, err.splitlines()


def sample(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, list[str]]:
    """``python train/sample.py <argv>``."""
    from train import sample as entry

    try:
        code = run_main(lambda: entry.main(list(argv)))
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    out, err = capsys.readouterr()
    return code, out, err.splitlines()


def one_error(code: int, err: list[str], *needles: str) -> str:
    """Exit code 2 and exactly one ``error:`` line (containing every needle), no traceback."""
    errors = [line for line in err if line.startswith("error: ")]
    assert code == 2, err
    assert len(errors) == 1, err
    assert not any("Traceback" in line for line in err), err
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with a digest of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def decode(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)]).astype(np.float64)


# ---------------------------------------------------------------------------------------------------------------
# 1. generated inputs only where the recipe marks them as generated


def test_1_synthetic_data_never_replaces_a_users_metadata(tmp_path: Path, assets: dict, capsys) -> None:
    users = tmp_path / "my-data"  # a metadata.jsonl listing videos by absolute path, no video file in the folder
    users.mkdir()
    rows = [{"file_name": str(p), "caption": "mine"} for p in sorted(assets["data"].glob("*.mp4"))]
    (users / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = snapshot(users)
    syn = {"synthetic": {"num_videos": 2, "frames": 13, "height": 32, "width": 32}}
    code, _, err = finetune(capsys, recipe_file(tmp_path, assets, data={"path": str(users), **syn}))
    one_error(code, err, "data.synthetic", str(users), "not generated here", ".generated-by-longvideo")
    assert snapshot(users) == before and not (tmp_path / "run").exists()
    code, _, err = finetune(capsys, recipe_file(tmp_path, assets, data={"path": "someone/videos", **syn}))
    one_error(code, err, "data.path='someone/videos' looks like a Hub id")


def test_1_tiny_model_never_at_a_hub_id_and_never_shadows_one(tmp_path: Path, assets: dict, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    hub_id = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    code, _, err = finetune(capsys, recipe_file(tmp_path, assets, model={"pretrained": hub_id, "create_tiny_random": True}))
    one_error(code, err, f"model.pretrained={hub_id!r} looks like a Hub id")
    assert not (tmp_path / "Wan-AI").exists()
    # generated explicitly as ./Wan-AI/... (a path): marked, reused on the next call, refused as `--model Wan-AI/...`
    from train.bootstrap import MARKER, create_missing_inputs
    from train.config import load_config

    cfg = load_config(None, ["model.create_tiny_random=true", f"model.pretrained=./{hub_id}", "data.path=./gen-data",
                             "data.synthetic.num_videos=2", "data.synthetic.frames=9", "data.synthetic.height=32",
                             "data.synthetic.width=32"])
    assert len(create_missing_inputs(cfg)) == 2 and create_missing_inputs(cfg) == []
    assert (tmp_path / hub_id / MARKER).is_file() and (tmp_path / "gen-data" / MARKER).is_file()
    code, _, err = sample(capsys, "--model", hub_id, "--prompt", "x", "--out", str(tmp_path / "v.mp4"))
    one_error(code, err, f"./{hub_id} is a tiny random model a recipe generated", f"pass ./{hub_id}")
    assert not (tmp_path / "v.mp4").exists()


# ---------------------------------------------------------------------------------------------------------------
# 2 (and 7: duplicate metrics rows, latest with nothing). Resume continues the recipe it started with, or applies
# the changes it allows and logs them


def test_2_resume_applies_a_new_learning_rate_and_logs_it(tmp_path: Path, assets: dict, capsys) -> None:
    run = tmp_path / "run"
    base = recipe_file(tmp_path, assets, train={"max_steps": 3, "checkpoint_every": 2})
    code, out, err = finetune(capsys, base, "train.resume_from=latest")  # nothing to resume yet: says so
    assert code == 0, err
    assert f"train.resume_from=latest: no checkpoint in {run / 'checkpoints'} yet; starting a fresh run" in out
    assert [r["step"] for r in metrics(run)] == [1, 2, 3]
    code, out, err = finetune(capsys, base, "train.resume_from=latest", "train.max_steps=4", "train.learning_rate=5e-4")
    assert code == 0, err
    assert "resume: train.learning_rate 0.001 -> 0.0005 from step 3" in out and "resume: train.max_steps 3 -> 4" in out
    rows = metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # the interrupted-run row of step 3 is replaced, not duplicated
    assert [r["lr"] for r in rows] == pytest.approx([1e-3, 1e-3, 5e-4, 5e-4])  # what ran
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["learning_rate"] == 5e-4 and saved["train"]["max_steps"] == 4
    assert json.loads((run / "final" / "meta.json").read_text())["train"]["learning_rate"] == 5e-4
    changes = [json.loads(line) for line in (run / "config-changes.jsonl").read_text().splitlines()]
    assert {(c["step"], c["key"], c["from"], c["to"]) for c in changes} == {
        (2, "train.learning_rate", 1e-3, 5e-4), (2, "train.max_steps", 3, 4)}
    # a change a resume cannot apply is refused before anything is written
    before = snapshot(run)
    code, _, err = finetune(capsys, base, "train.resume_from=latest", "train.max_steps=5", "lora.rank=8")
    one_error(code, err, "lora.rank: 4 -> 8", "may change only train.learning_rate, train.max_steps")
    assert snapshot(run) == before


def test_2_resume_latest_of_a_finished_run_without_checkpoints_is_an_error(tmp_path: Path, assets: dict, capsys) -> None:
    base = recipe_file(tmp_path, assets, train={"max_steps": 1})
    assert finetune(capsys, base)[0] == 0
    code, _, err = finetune(capsys, base, "train.resume_from=latest", "train.max_steps=2")
    one_error(code, err, "holds a finished run (final/) but no checkpoint to continue from")


# ---------------------------------------------------------------------------------------------------------------
# 3. bad steps never poison checkpoints


def test_3_no_checkpoint_during_a_bad_streak_and_the_error_names_the_one_to_resume(
    tmp_path: Path, assets: dict, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    adapter_cls = get_adapter("wan")
    real_predict = adapter_cls.predict
    calls = {"n": 0}

    def predict_then_diverge(self, *args, **kwargs):  # test-side fault injection: steps 3+ give NaN
        calls["n"] += 1
        out = real_predict(self, *args, **kwargs)
        return out * float("nan") if calls["n"] > 2 else out

    monkeypatch.setattr(adapter_cls, "predict", predict_then_diverge)
    run = tmp_path / "run"
    base = recipe_file(tmp_path, assets, train={"max_steps": 6, "checkpoint_every": 1, "checkpoints_keep": 1,
                                                "max_bad_steps_in_a_row": 2})
    code, out, err = finetune(capsys, base)
    good = run / "checkpoints" / "checkpoint-000002"
    line = one_error(code, err, "2 steps in a row had a NaN/inf loss", f"the last checkpoint before them is {good}",
                     f"train.resume_from={good} train.learning_rate=0.0001")
    assert "checkpoint postponed" in out
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["checkpoint-000002"]
    monkeypatch.setattr(adapter_cls, "predict", real_predict)
    advised = line[line.index("(train.resume_from=") + 1:]
    command = advised[: advised.index(")")].split()  # the overrides the error advises
    code, out, err = finetune(capsys, base, *command)
    assert code == 0, err
    assert f"resumed from {good} at step 2" in out
    assert all(math.isfinite(r["loss"]) for r in metrics(run) if r["step"] > 2)


def test_3_rotation_keeps_the_checkpoint_before_a_bad_streak(tmp_path: Path) -> None:
    from train.checkpointing import list_checkpoints, rotate

    for step in (2, 4, 6):
        (tmp_path / "checkpoints" / f"checkpoint-{step:06d}").mkdir(parents=True)
    rotate(tmp_path, keep=1, protect="checkpoint-000002")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-000002", "checkpoint-000006"]


# ---------------------------------------------------------------------------------------------------------------
# 4. sample.py --lora takes every form of our weights and fails loudly when nothing matches


def test_4_sample_lora_forms_change_the_video_and_a_mismatch_fails(tmp_path: Path, assets: dict, capsys) -> None:
    from safetensors.torch import load_file, save_file

    from train.exporting import export_checkpoint

    run = tmp_path / "run"
    code, _, err = finetune(capsys, recipe_file(tmp_path, assets, lora={"rank": 4, "alpha": 16},
                                                train={"max_steps": 3, "learning_rate": 2e-2}))
    assert code == 0, err
    export_checkpoint(str(run), str(tmp_path / "export"), lora_formats=["diffusers"], dtype="fp32")
    common = ["--model", str(assets["model"]), "--prompt", "a red square", "--frames", "9", "--height", "32",
              "--width", "32", "--steps", "2", "--attention", "dense", "--guidance-scale", "1.0"]
    assert sample(capsys, *common, "--out", str(tmp_path / "base.mp4"))[0] == 0
    base = decode(tmp_path / "base.mp4")
    videos = {}
    for name, lora in {"run": run, "final": run / "final", "file": run / "final" / "weights" / "lora.safetensors",
                       "export": tmp_path / "export"}.items():
        code, out, err = sample(capsys, *common, "--lora", str(lora), "--out", str(tmp_path / f"{name}.mp4"))
        assert code == 0, err
        assert "LoRA applied to" in out
        videos[name] = decode(tmp_path / f"{name}.mp4")
        assert np.abs(videos[name] - base).mean() > 0.5, name  # the LoRA changed the video
    assert np.abs(videos["run"] - videos["final"]).max() == 0 and np.abs(videos["run"] - videos["file"]).max() == 0
    assert np.abs(videos["run"] - videos["export"]).mean() < 0.5  # the export (alpha in its metadata) renders the same

    # a LoRA of another family: HunyuanVideo module names, nothing matches Wan's
    other = {f"transformer.transformer_blocks.0.attn.to_{p}.lora_{ab}.weight": np.zeros(1) for p in "qkv" for ab in "AB"}
    import torch

    other = {k: torch.zeros(4, 32) if ".lora_A." in k else torch.zeros(32, 4) for k in other}
    save_file(other, str(tmp_path / "hunyuan_lora.safetensors"))
    code, _, err = sample(capsys, *common, "--lora", str(tmp_path / "hunyuan_lora.safetensors"), "--out", str(tmp_path / "x.mp4"))
    one_error(code, err, "hunyuan_lora.safetensors", "wan transformer")
    # ours plus modules the model does not have: named, not silently dropped
    state = load_file(str(tmp_path / "export" / "pytorch_lora_weights.safetensors"))
    state.update({k: v for k, v in other.items()})
    save_file(state, str(tmp_path / "mixed.safetensors"))
    code, _, err = sample(capsys, *common, "--lora", str(tmp_path / "mixed.safetensors"), "--out", str(tmp_path / "x.mp4"))
    one_error(code, err, "match no layer of the wan transformer", "transformer_blocks.0.attn.to_")
    # a mistyped relative --lora is named at once, not sent to the Hub
    code, _, err = sample(capsys, *common, "--lora", "runs/my-rn/final", "--out", str(tmp_path / "x.mp4"))
    one_error(code, err, "--lora: runs/my-rn/final does not exist")
    # a Hub id that cannot be fetched (the tests run offline): one line, not diffusers' traceback
    code, _, err = sample(capsys, *common, "--lora", "nobody-here/no-such-lora", "--out", str(tmp_path / "x.mp4"))
    one_error(code, err, "--lora nobody-here/no-such-lora: cannot load it from the Hub")
    assert not (tmp_path / "x.mp4").exists()


# ---------------------------------------------------------------------------------------------------------------
# 5 (and 7: overwrite leaves no old export/ or validation/). The whole recipe is validated before the run folder
# changes


def test_5_a_late_config_error_changes_nothing_in_the_run_folder(tmp_path: Path, assets: dict, capsys) -> None:
    run = tmp_path / "run"
    base = recipe_file(tmp_path, assets, train={"max_steps": 2, "checkpoint_every": 1, "overwrite_output_dir": True})
    assert finetune(capsys, base)[0] == 0
    for sub in ("export", "validation/step-000002"):
        (run / sub).mkdir(parents=True)
        (run / sub / "old.txt").write_text("from the earlier run")
    before = snapshot(run)
    late = ["validation.every_steps=1", "validation.prompts=[a fox]", "validation.frames=32"]
    code, _, err = finetune(capsys, base, *late)
    one_error(code, err, "validation.frames/height/width = 32x32x32", "4k+1")
    assert snapshot(run) == before  # overwrite_output_dir deleted nothing: the recipe was refused first
    code, _, err = finetune(capsys, base, "train.resume_from=latest", "train.max_steps=3", *late)
    one_error(code, err, "validation.frames")
    assert snapshot(run) == before  # config.yaml not rewritten with the invalid value
    code, _, err = finetune(capsys, base, "export.at_end=true", "export.lora_formats=[diffusers, safetensor]")
    one_error(code, err, "export.lora_formats", "'safetensor'")
    assert snapshot(run) == before
    code, out, err = finetune(capsys, base)  # a valid overwrite replaces every output of the earlier run
    assert code == 0, err
    assert not (run / "export").exists() and not (run / "validation").exists()
    assert "removed the earlier run's checkpoints, final, export, validation, metrics.jsonl" in out


# ---------------------------------------------------------------------------------------------------------------
# 6. one `error:` line instead of a traceback


def _messy_data(tmp_path: Path, assets: dict, kind: str) -> str:
    folder = tmp_path / f"data-{kind}"
    folder.mkdir()
    videos = sorted(assets["data"].glob("*.mp4"))
    if kind == "latin1_txt":
        for v in videos:
            (folder / v.name).symlink_to(v)
            (folder / v.with_suffix(".txt").name).write_text("a red square")
        (folder / videos[1].with_suffix(".txt").name).write_bytes("un carr\u00e9 rouge".encode("latin-1"))
        return str(folder)
    for v in videos:
        (folder / v.name).symlink_to(v)
    text = {
        "malformed": '{"file_name": "video_00000.mp4", "caption": "a"}\n{"file_name": "video_00001.mp4", "caption": "b"\n',
        "empty": "",
        "surrogate": '{"file_name": "video_00000.mp4", "caption": "a \\udc80"}\n',
    }[kind]
    (folder / "metadata.jsonl").write_text(text)
    return str(folder)


@pytest.mark.parametrize(
    "kind, needles",
    [
        ("malformed", ["metadata.jsonl:2: malformed JSON", "expected one JSON object per line"]),
        ("empty", ["metadata.jsonl is empty"]),
        ("surrogate", ["metadata.jsonl:1: 'caption': invalid unicode"]),
        ("latin1_txt", ["video_00001.txt: line 1: not UTF-8 text"]),
    ],
)
def test_6_broken_metadata_and_captions_are_one_line(tmp_path: Path, assets: dict, capsys, kind: str, needles: list) -> None:
    code, _, err = finetune(capsys, recipe_file(tmp_path, assets, data={"path": _messy_data(tmp_path, assets, kind)}))
    one_error(code, err, *needles)
    assert not (tmp_path / "run").exists()


def test_6_mistyped_local_paths_are_named_not_sent_to_the_hub(tmp_path: Path, assets: dict, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    code, _, err = finetune(capsys, recipe_file(tmp_path, assets, data={"path": "data/my_vidoes"}))
    one_error(code, err, "data.path='data/my_vidoes' does not exist", "owner/name")
    code, _, err = finetune(capsys, recipe_file(tmp_path, assets, model={"pretrained": "./models/wan"}))
    one_error(code, err, "model.pretrained='./models/wan' does not exist")


def test_6_damaged_checkpoint_falls_back_or_is_named(tmp_path: Path, assets: dict, capsys) -> None:
    run = tmp_path / "run"
    base = recipe_file(tmp_path, assets, train={"max_steps": 3, "checkpoint_every": 1, "checkpoints_keep": 3})
    assert finetune(capsys, base)[0] == 0
    newest = run / "checkpoints" / "checkpoint-000002"
    damaged = sorted((newest / "accelerate").glob("optimizer*"))[0]
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])  # a copy cut short
    code, _, err = finetune(capsys, base, f"train.resume_from={newest}", "train.max_steps=4")
    one_error(code, err, f"cannot resume from {newest}", str(damaged.relative_to(run.parent).name))
    code, out, err = finetune(capsys, base, "train.resume_from=latest", "train.max_steps=4")
    assert code == 0, err
    assert f"warning: skipping damaged checkpoint checkpoint-000002: {damaged}" in out
    assert f"resumed from {run / 'checkpoints' / 'checkpoint-000001'} at step 1" in out
    (run / "checkpoints" / "checkpoint-000003" / "training_state.json").write_text('{"step": 3,')
    code, out, err = finetune(capsys, base, "train.resume_from=latest", "train.max_steps=5")
    assert code == 0, err
    assert "skipping damaged checkpoint checkpoint-000003" in out and "training_state.json" in out


def test_6_bare_accelerate_launch_shows_our_line_and_no_traceback_of_ours(tmp_path: Path, assets: dict) -> None:
    data = _messy_data(tmp_path, assets, "malformed")
    recipe = recipe_file(tmp_path, assets, data={"path": data})
    env = {**os.environ, "PYTHONPATH": "", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    accelerate = Path(sys.executable).parent / "accelerate"
    proc = subprocess.run(
        [str(accelerate), "launch", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "--cpu", str(REPO / "train" / "finetune.py"), "--config", str(recipe)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(ours) == 1 and "metadata.jsonl:2: malformed JSON" in ours[0], proc.stderr
    frames = [line for line in proc.stderr.splitlines() if line.strip().startswith('File "')]
    assert frames and not [f for f in frames if any(f"{REPO / pkg}/" in f for pkg in ("train", "data", "sparse_attn"))], proc.stderr  # accelerate's CalledProcessError only (-q hides it)


# ---------------------------------------------------------------------------------------------------------------
# 7. the summary reports skipped data; no advice to set what is set


def test_7_summary_reports_skipped_data_and_no_cache_advice(tmp_path: Path, assets: dict, capsys) -> None:
    folder = tmp_path / "with-a-broken-video"
    folder.mkdir()
    for v in sorted(assets["data"].glob("*.mp4")):
        (folder / v.name).symlink_to(v)
    (folder / "broken.mp4").write_bytes(b"junk" * 64)
    names = [v.name for v in sorted(assets["data"].glob("*.mp4"))] + ["broken.mp4"]
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "caption": "c"}) + "\n" for n in names))
    code, out, err = finetune(capsys, recipe_file(tmp_path, assets, data={"path": str(folder), "cache_dir": str(tmp_path / "cache")},
                                                  train={"max_steps": 1}))
    assert code == 0, err
    summary = out[out.index("done."):]
    assert "data:            4 videos, 3 used (3 clips), 1 skipped (unreadable: 1)" in summary
    assert "set data.cache_dir to train from it" not in out + "\n".join(err)
