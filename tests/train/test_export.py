"""Export: diffusers / ComfyUI LoRA, merged and full transformers, model card, Hub upload, CLI errors.

Every family with an adapter gets the same checks on a tiny random pipeline (adapter.save_tiny_random):
a LoRA is added with peft exactly as the trainer does, a checkpoint folder is written in the trainer's layout,
and the export is judged by diffusers' own loaders (load_lora_weights, from_pretrained, its Wan converter)
against the LoRA model's transformer output.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

import diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from train import checkpointing, exporting
from train.config import load_config, save_config
from train.models import ADAPTERS, get_adapter

REPO = Path(__file__).resolve().parents[2]
RANK, ALPHA = 4, 8.0  # alpha != rank: the scale must survive every format
FAKE_TOKEN = "hf_FAKEtoken0123456789abcdefXYZ"


def _available_families() -> list[str]:
    found = []
    for family, target in ADAPTERS.items():
        try:
            importlib.import_module(target.split(":")[0])
        except ModuleNotFoundError:
            continue
        found.append(family)
    return found


FAMILIES = _available_families()


# ------------------------------------------------------------------------------------------------------------------
# fixtures: a tiny pipeline, a trained-looking LoRA, a checkpoint folder in the trainer's layout


class Case:
    """Everything one family's tests need, built once per module."""

    def __init__(self, family: str, root: Path) -> None:
        torch.manual_seed(0)
        self.family = family
        self.cls = get_adapter(family)
        self.tiny = self.cls.save_tiny_random(str(root / f"tiny-{family}"), seed=0)
        self.adapter = self.cls(self.tiny, None, torch.float32)
        frames = self.cls.frame_multiple * 2 + 1
        self.geometry = self.adapter.geometry(frames, 32, 32)
        encoders = self.adapter.load_encoders(torch.device("cpu"))
        self.cond = self.adapter.encode_prompts(encoders, ["a red fox running through snow"])
        base = self.adapter.load_transformer().eval()
        self.base_state = {k: v.detach().clone() for k, v in base.state_dict().items()}
        c = base.config
        gen = torch.Generator().manual_seed(1)
        g = self.geometry
        latents = torch.randn(1, c.in_channels, g.latent_frames, g.latent_height, g.latent_width, generator=gen)
        noise = torch.randn(latents.shape, generator=gen)
        self.noisy, self.timesteps, _ = self.adapter.training_pair(latents, noise, torch.tensor([0.6]))
        self.base_out = self.predict(base)
        # the trainer's LoRA (train/trainer.py _build_model), with non-zero lora_B as after training
        self.targets = list(self.cls.default_lora_targets)
        base.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=self.targets, init_lora_weights=True))
        with torch.no_grad():
            for name, p in base.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.2, generator=gen)
        self.lora_state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(base).items()}
        self.lora_out = self.predict(base)
        self.run = self.write_run(root / f"run-{family}")

    def predict(self, transformer: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return self.adapter.predict(transformer, self.noisy, self.timesteps, self.cond)

    def meta(self, step: int, mode: str = "lora") -> dict[str, Any]:
        g = self.geometry
        return {
            "step": step,
            "family": self.family,
            "mode": mode,
            "pretrained": self.tiny,
            "revision": None,
            "lora": {"rank": RANK, "alpha": ALPHA, "dropout": 0.0, "target_modules": self.targets},
            "attention": {"type": "radial", "backend": "auto", "block_size": 64, "dense_layers": 1, "decay_factor": 0.9,
                          "attention_sink": None, "num_q_clusters": 100, "num_k_clusters": 500, "top_p": 0.9,
                          "min_kc_ratio": 0.1, "kmeans_iters": None},
            "data": {"frames": g.frames, "height": g.height, "width": g.width, "fps": 16.0, "path": "data/foxes-long"},
            "train": {"max_steps": 7, "learning_rate": 1e-4, "batch_size": 1},
            "world_size": 1,
            "zero_stage": 0,
            "ema": False,
        }

    def write_run(self, run: Path) -> Path:
        cfg = load_config(None, [f"model.family={self.family}", f"model.pretrained={self.tiny}", "data.path=data/foxes-long",
                                 f"lora.rank={RANK}", f"lora.alpha={ALPHA}", "train.max_steps=7"])
        save_config(cfg, run / "config.yaml")
        for step, folder in ((3, run / "checkpoints" / "checkpoint-000003"), (7, run / "final")):
            (folder / "weights").mkdir(parents=True)
            save_file(self.lora_state, str(folder / "weights" / "lora.safetensors"), metadata={"format": "pt"})
            (folder / "meta.json").write_text(json.dumps(self.meta(step)))
        return run

    def pipeline(self) -> Any:
        return getattr(diffusers, self.cls.pipeline_class).from_pretrained(self.tiny, dtype=torch.float32)


_CASES: dict[str, Case] = {}


def _case(family: str, factory: pytest.TempPathFactory) -> Case:
    if family not in FAMILIES:
        pytest.skip(f"no {family} adapter yet")
    if family not in _CASES:
        _CASES[family] = Case(family, factory.mktemp(f"export-{family}"))
    return _CASES[family]


@pytest.fixture(scope="module", params=FAMILIES)
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Case:
    return _case(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def wan(tmp_path_factory: pytest.TempPathFactory) -> Case:
    return _case("wan", tmp_path_factory)


@pytest.fixture(scope="module")
def hunyuan(tmp_path_factory: pytest.TempPathFactory) -> Case:
    return _case("hunyuan_video", tmp_path_factory)


@contextlib.contextmanager
def captured_library_logs() -> Iterator[io.StringIO]:
    """Everything diffusers / peft log at WARNING or above, plus Python warnings, into one buffer."""
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setLevel(logging.WARNING)
    loggers = [logging.getLogger(n) for n in ("diffusers", "peft", "transformers")]
    for lg in loggers:
        lg.addHandler(handler)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield buf
        finally:
            for lg in loggers:
                lg.removeHandler(handler)
    for w in caught:
        buf.write(f"{w.category.__name__}: {w.message}\n")


def export(case: Case, out: Path, **kw: Any) -> exporting.ExportResult:
    kw.setdefault("dtype", "fp32")
    return exporting.export_checkpoint(case.run, out, log=lambda _: None, **kw)


# ------------------------------------------------------------------------------------------------------------------
# diffusers LoRA


def test_diffusers_lora_loads_and_reproduces_the_trained_model(case: Case, tmp_path: Path) -> None:
    res = export(case, tmp_path / "out", lora_formats="diffusers")
    path = tmp_path / "out" / exporting.LORA_FILE
    assert exporting.LORA_FILE in res.files and exporting.COMFYUI_FILE not in res.files
    tensors = load_file(str(path))
    assert set(tensors) == {f"transformer.{k}" for k in case.lora_state}
    with safe_open(str(path), "pt") as f:
        header = json.loads(f.metadata()["lora_adapter_metadata"])
    assert header["transformer.r"] == RANK and header["transformer.lora_alpha"] == ALPHA
    assert set(header["transformer.target_modules"]) == set(case.targets)

    pipe = case.pipeline()
    assert not torch.allclose(case.predict(pipe.transformer), case.lora_out, atol=1e-4)  # the LoRA matters
    with captured_library_logs() as logs:
        pipe.load_lora_weights(str(tmp_path / "out"))
    assert logs.getvalue() == ""
    torch.testing.assert_close(case.predict(pipe.transformer), case.lora_out, rtol=1e-5, atol=1e-5)


def test_log_capture_sees_an_incomplete_lora(wan: Case, tmp_path: Path) -> None:
    """Negative control: a file with a module missing makes diffusers warn, and the capture sees it."""
    export(wan, tmp_path / "out", lora_formats="diffusers")
    path = tmp_path / "out" / exporting.LORA_FILE
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = {k: v for k, v in load_file(str(path)).items() if ".blocks.1.attn1.to_q." not in k}
    save_file(tensors, str(path), metadata=meta)
    with captured_library_logs() as logs:
        wan.pipeline().load_lora_weights(str(tmp_path / "out"))
    assert "blocks.1.attn1.to_q" in logs.getvalue()


def test_default_dtype_is_bf16_and_metadata_is_what_diffusers_writes(wan: Case, tmp_path: Path) -> None:
    exporting.export_checkpoint(wan.run, tmp_path / "out", lora_formats="diffusers", log=lambda _: None)
    tensors = load_file(str(tmp_path / "out" / exporting.LORA_FILE))
    assert {v.dtype for v in tensors.values()} == {torch.bfloat16}
    # diffusers' own writer, fed the trainer's peft config, gives the same header
    ref = tmp_path / "ref"
    cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=wan.targets, init_lora_weights=True)
    diffusers.WanPipeline.save_lora_weights(str(ref), transformer_lora_layers=wan.lora_state,
                                            transformer_lora_adapter_metadata=cfg.to_dict())
    with safe_open(str(tmp_path / "out" / exporting.LORA_FILE), "pt") as a, safe_open(str(ref / exporting.LORA_FILE), "pt") as b:
        assert a.metadata() == b.metadata()


# ------------------------------------------------------------------------------------------------------------------
# ComfyUI LoRA


def test_comfyui_keys_follow_the_original_names(case: Case, tmp_path: Path) -> None:
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in case.lora_state})
    if any(case.adapter.comfyui_key(m) is None for m in modules):  # a family without original names for them
        # asking for ComfyUI alone would export no weights at all: refused, naming why, nothing written
        with pytest.raises(ValueError, match="nothing to export: ComfyUI LoRA skipped"):
            export(case, tmp_path / "out", lora_formats="comfyui")
        assert not (tmp_path / "out").exists()
        return
    export(case, tmp_path / "out", lora_formats="comfyui")
    tensors = load_file(str(tmp_path / "out" / exporting.COMFYUI_FILE))
    with safe_open(str(tmp_path / "out" / exporting.COMFYUI_FILE), "pt") as f:
        assert "lora_adapter_metadata" not in (f.metadata() or {})  # the scale is baked in, not declared
    names = {case.adapter.comfyui_key(m) for m in modules}
    assert None not in names
    assert set(tensors) == {f"diffusion_model.{n}.lora_{ab}.weight" for n in names for ab in "AB"}
    # An original weight may fuse several diffusers Linears (q, k, v [, mlp]); its LoRA must cover all their rows.
    linears = {n: m.out_features for n, m in case.adapter.load_transformer().named_modules() if isinstance(m, torch.nn.Linear)}
    for name in names:
        a = tensors[f"diffusion_model.{name}.lora_A.weight"].double()
        b = tensors[f"diffusion_model.{name}.lora_B.weight"].double()
        got = b @ a  # baked: ComfyUI applies strength 1 and no alpha
        parts = [m for m in linears if case.adapter.comfyui_key(m) == name]
        assert got.shape[0] == sum(linears[m] for m in parts), name
        covered = 0
        for m in parts:
            if m not in modules:
                continue
            want = ALPHA / RANK * (case.lora_state[f"{m}.lora_B.weight"].double() @ case.lora_state[f"{m}.lora_A.weight"].double())
            hits = [i for i in range(got.shape[0] - want.shape[0] + 1) if torch.allclose(got[i : i + want.shape[0]], want, rtol=1e-5, atol=1e-7)]
            assert hits, f"{m}'s trained delta is not inside {name}"
            covered += want.shape[0]
        # rows of untrained parts are zero
        assert torch.count_nonzero(got.abs().sum(dim=1) > 1e-12) <= covered


def test_hunyuan_comfyui_double_blocks_map_back_through_diffusers_converter(hunyuan: Case, tmp_path: Path) -> None:
    """diffusers' HunyuanVideo converter splits img_attn_qkv / txt_attn_qkv (A shared, B chunked in q, k, v order):
    the block-diagonal fused LoRA must come back as the trained per-projection deltas. (Its single-block branch
    hard-codes the real model's 3072 width, so the tiny model is checked on the double blocks.)"""
    from diffusers.loaders.lora_conversion_utils import _convert_hunyuan_video_lora_to_diffusers

    export(hunyuan, tmp_path / "out", lora_formats="comfyui")
    comfy = load_file(str(tmp_path / "out" / exporting.COMFYUI_FILE))
    double = {k: v.clone() for k, v in comfy.items() if k.startswith("diffusion_model.double_blocks.")}
    assert any("img_attn_qkv" in k for k in double) and any("img_attn_proj" in k for k in double)
    converted = _convert_hunyuan_video_lora_to_diffusers(double)
    trained = {m for m in (k.rsplit(".lora_", 1)[0] for k in hunyuan.lora_state) if m.startswith("transformer_blocks.")}
    assert trained and trained <= {k.removeprefix("transformer.").rsplit(".lora_", 1)[0] for k in converted}
    for m in trained:
        got = converted[f"transformer.{m}.lora_B.weight"].double() @ converted[f"transformer.{m}.lora_A.weight"].double()
        want = ALPHA / RANK * (hunyuan.lora_state[f"{m}.lora_B.weight"].double() @ hunyuan.lora_state[f"{m}.lora_A.weight"].double())
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_comfyui_layout_needs_the_base_config() -> None:
    """Fused layouts come from the base transformer's config; an unreadable base (offline, not cached) -> None,
    and the export then skips the ComfyUI file with a note instead of guessing."""
    assert exporting.linear_out_features("wan", "nobody-here/no-such-model-xyz") is None


def test_wan_comfyui_maps_back_through_diffusers_converter(wan: Case, tmp_path: Path) -> None:
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_wan_lora_to_diffusers

    export(wan, tmp_path / "out", lora_formats="comfyui")
    comfy = load_file(str(tmp_path / "out" / exporting.COMFYUI_FILE))
    assert any(k.startswith("diffusion_model.blocks.0.self_attn.q.") for k in comfy)
    assert any(k.startswith("diffusion_model.blocks.0.self_attn.o.") for k in comfy)
    converted = _convert_non_diffusers_wan_lora_to_diffusers({k: v.clone() for k, v in comfy.items()})
    assert set(converted) == {f"transformer.{k}" for k in wan.lora_state}
    # and diffusers loads the ComfyUI file into the pipeline with the trained behaviour (scale baked in)
    pipe = wan.pipeline()
    with captured_library_logs() as logs:
        pipe.load_lora_weights(str(tmp_path / "out"), weight_name=exporting.COMFYUI_FILE)
    assert logs.getvalue() == ""
    torch.testing.assert_close(wan.predict(pipe.transformer), wan.lora_out, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------------------------
# merged and full transformers


def test_merge_equals_base_plus_lora(case: Case, tmp_path: Path) -> None:
    res = export(case, tmp_path / "out", merge=True, lora_formats="none", max_shard_size="40KB")
    folder = tmp_path / "out" / "transformer"
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    assert len(shards) > 1 and (folder / "diffusion_pytorch_model.safetensors.index.json").is_file(), res.files
    cls = getattr(diffusers, case.cls.transformer_class)
    merged = cls.from_pretrained(str(tmp_path / "out"), subfolder="transformer", dtype=torch.float32).eval()
    state = merged.state_dict()
    assert set(state) == set(case.base_state)
    modules = {k.rsplit(".lora_", 1)[0] for k in case.lora_state}
    for key, base in case.base_state.items():
        module = key.rsplit(".", 1)[0]
        if key.endswith(".weight") and module in modules:
            a = case.lora_state[f"{module}.lora_A.weight"].double()
            b = case.lora_state[f"{module}.lora_B.weight"].double()
            want = base.double() + ALPHA / RANK * (b @ a)
            torch.testing.assert_close(state[key].double(), want, rtol=0, atol=1e-6)
        else:
            assert torch.equal(state[key], base), key
    torch.testing.assert_close(case.predict(merged), case.lora_out, rtol=1e-5, atol=1e-5)


def test_full_finetune_exports_the_trained_transformer(wan: Case, tmp_path: Path) -> None:
    trained = wan.adapter.load_transformer()
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.01 * torch.randn_like(p))
    run = tmp_path / "run-full"
    (run / "final" / "weights").mkdir(parents=True)
    trained.save_pretrained(str(run / "final" / "weights" / "transformer"))
    (run / "final" / "meta.json").write_text(json.dumps(wan.meta(7, mode="full")))
    exporting.export_checkpoint(run, tmp_path / "out", dtype="fp16", log=lambda _: None)
    stored: dict[str, torch.Tensor] = {}
    for shard in (tmp_path / "out" / "transformer").glob("*.safetensors"):
        stored.update(load_file(str(shard)))
    want = trained.state_dict()
    assert set(stored) == set(want)
    for key, value in stored.items():  # fp16, except the modules diffusers keeps in fp32
        assert value.dtype in (torch.float16, torch.float32), key
        assert torch.equal(value, want[key].to(value.dtype)), key
    assert sum(v.dtype == torch.float16 for v in stored.values()) > len(stored) // 2
    loaded = diffusers.WanTransformer3DModel.from_pretrained(str(tmp_path / "out"), subfolder="transformer", dtype=torch.float16)
    assert loaded.config.num_layers == trained.config.num_layers
    assert not (tmp_path / "out" / exporting.LORA_FILE).exists()
    assert "full fine-tune" in (tmp_path / "out" / "README.md").read_text()


# ------------------------------------------------------------------------------------------------------------------
# model card, config, checkpoint resolution, atomic output


def test_model_card_and_training_config(wan: Case, tmp_path: Path) -> None:
    export(wan, tmp_path / "out", merge=True)
    card = (tmp_path / "out" / "README.md").read_text()
    for needle in (wan.tiny, "radial", "decay_factor=0.9", "first 1 blocks dense", "block size 64",
                   f"{wan.geometry.frames} frames, 32x32", "data/foxes-long", "7 of 7", f"rank {RANK}, alpha {ALPHA}",
                   "WanPipeline", "load_lora_weights", "WanTransformer3DModel", "train/sample.py", "--attention radial",
                   "--decay-factor 0.9", "--dense-layers 1", exporting.COMFYUI_FILE):
        assert needle in card, needle
    assert card.startswith("---\nlibrary_name: diffusers")
    # the card's sampler command is one that train/sample.py accepts, with the trained attention settings
    import importlib.util
    import shlex

    line = next(ln for ln in card.splitlines() if ln.startswith("python train/sample.py"))
    spec = importlib.util.spec_from_file_location("_sample_cli_card", REPO / "train" / "sample.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)  # type: ignore[union-attr]
    o = cli.parse_args(shlex.split(line)[2:])
    assert (o.model, o.lora, o.attention.type, o.attention.decay_factor, o.attention.dense_layers, o.attention.block_size) == (
        wan.tiny, str(tmp_path / "out"), "radial", 0.9, 1, 64)
    assert (o.frames, o.height, o.width) == (wan.geometry.frames, 32, 32)
    assert (tmp_path / "out" / "training_config.yaml").read_text() == (wan.run / "config.yaml").read_text()
    assert json.loads((tmp_path / "out" / "training_meta.json").read_text())["step"] == 7
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_checkpoint_resolution(wan: Case, tmp_path: Path) -> None:
    assert checkpointing.resolve_checkpoint(wan.run).folder == wan.run / "final"
    ckpt = checkpointing.resolve_checkpoint(wan.run / "checkpoints" / "checkpoint-000003")
    assert ckpt.meta["step"] == 3 and ckpt.config_path == wan.run / "config.yaml"
    run = tmp_path / "run"
    for step in (2, 10):  # numeric order, not the order of names
        folder = run / "checkpoints" / f"checkpoint-{step:06d}"
        folder.mkdir(parents=True)
        (folder / "meta.json").write_text(json.dumps(wan.meta(step)))
    (run / "checkpoints" / ".tmp-checkpoint-000020").mkdir()  # an interrupted save is ignored
    # the newest complete checkpoint is chosen, and its missing weights are reported by path
    with pytest.raises(FileNotFoundError, match="checkpoint-000010/weights/lora.safetensors is missing"):
        checkpointing.resolve_checkpoint(run)
    with pytest.raises(ValueError, match="holds no checkpoint"):
        checkpointing.resolve_checkpoint(run / "checkpoints")


def test_output_is_atomic_and_needs_force(wan: Case, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty; pass --force"):
        export(wan, out)
    assert (out / "keep.txt").read_text() == "mine"
    # a failure half-way leaves the old folder as it was and no staging folder behind
    bad = tmp_path / "bad-run"
    (bad / "final" / "weights").mkdir(parents=True)
    save_file({"blocks.0.attn1.to_q.lora_A.default.weight": torch.zeros(RANK, 32)}, str(bad / "final" / "weights" / "lora.safetensors"))
    (bad / "final" / "meta.json").write_text(json.dumps(wan.meta(1)))
    with pytest.raises(ValueError, match="unsupported key 'blocks.0.attn1.to_q.lora_A.default.weight'"):
        exporting.export_checkpoint(bad, out, force=True, log=lambda _: None)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    export(wan, out, force=True)
    assert not (out / "keep.txt").exists() and (out / exporting.LORA_FILE).is_file()


# ------------------------------------------------------------------------------------------------------------------
# Hub


class StubHub:
    def __init__(self, fail: BaseException | None = None) -> None:
        self.calls: list[tuple[str, dict]] = []
        self.fail = fail
        self.snapshot: list[str] = []

    def create_repo(self, **kw: Any) -> str:
        self.calls.append(("create_repo", kw))
        if self.fail is not None:
            raise self.fail
        return f"https://huggingface.co/{kw['repo_id']}"

    def upload_folder(self, **kw: Any) -> None:
        self.calls.append(("upload_folder", kw))
        self.snapshot = sorted(str(p.relative_to(kw["folder_path"])) for p in Path(kw["folder_path"]).rglob("*") if p.is_file())


def test_push_to_hub_uploads_the_folder_without_the_token(wan: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capfd: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    hub = StubHub()
    res = exporting.export_checkpoint(wan.run, tmp_path / "out", dtype="fp32", push_to_hub="me/fox-lora", private=True, hub_api=hub)
    assert [c[0] for c in hub.calls] == ["create_repo", "upload_folder"]
    assert hub.calls[0][1] == {"repo_id": "me/fox-lora", "repo_type": "model", "private": True, "exist_ok": True}
    assert Path(hub.calls[1][1]["folder_path"]) == tmp_path / "out" and hub.calls[1][1]["repo_id"] == "me/fox-lora"
    assert exporting.LORA_FILE in hub.snapshot and "README.md" in hub.snapshot
    assert res.hub_url == "https://huggingface.co/me/fox-lora"
    assert 'pipe.load_lora_weights("me/fox-lora")' in (tmp_path / "out" / "README.md").read_text()
    out, err = capfd.readouterr()
    assert FAKE_TOKEN not in out + err and "me/fox-lora" in out
    for p in tmp_path.rglob("*"):
        if p.is_file():
            assert FAKE_TOKEN.encode() not in p.read_bytes(), p


def test_push_errors_are_one_clear_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from train.hub import HubError, push_folder

    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    (tmp_path / "README.md").write_text("x")

    class Unauthorized(Exception):
        def __init__(self) -> None:
            super().__init__(f"401 Client Error: Unauthorized (token {FAKE_TOKEN})")
            self.response = type("R", (), {"status_code": 401})()

    with pytest.raises(HubError, match="refused access to 'me/x'.*HF_TOKEN") as err:
        push_folder(tmp_path, "me/x", api=StubHub(fail=Unauthorized()))
    assert FAKE_TOKEN not in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(HubError, match="upload to 'me/x' failed: RuntimeError: boom \\*\\*\\*") as err:
        push_folder(tmp_path, "me/x", api=StubHub(fail=RuntimeError(f"boom {FAKE_TOKEN}")))
    with pytest.raises(HubError, match="cannot reach the Hugging Face Hub"):
        push_folder(tmp_path, "me/x", api=StubHub(fail=ConnectionError("no route")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError, match="offline"):
        push_folder(tmp_path, "me/x")
    with pytest.raises(ValueError, match="repo id like 'user/name'"):
        push_folder(tmp_path, "a/b/c", api=StubHub())


def test_push_offline_keeps_the_export(wan: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from train.hub import HubError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError, match="offline.*the export itself is complete in"):
        export(wan, tmp_path / "out", push_to_hub="me/fox-lora")
    assert (tmp_path / "out" / exporting.LORA_FILE).is_file()


# ------------------------------------------------------------------------------------------------------------------
# bad arguments


def test_cli_missing_checkpoint_is_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "train" / "export.py"), "--checkpoint", str(tmp_path / "nope"),
                           "--output", str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: --checkpoint: {tmp_path / 'nope'} does not exist"]
    assert not (tmp_path / "out").exists()


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    """train/export.py's main through train.cli.run_main, as `python train/export.py` runs it (in-process: fast)."""
    import importlib.util

    from train.cli import run_main

    spec = importlib.util.spec_from_file_location("_export_cli", REPO / "train" / "export.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)  # type: ignore[union-attr]
    try:
        code = run_main(lambda: cli.main(argv))
    except SystemExit as exit_:  # argparse
        code = int(exit_.code or 0)
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--dtype", "fp8"], "error: --dtype: expected one of bf16, fp16, fp32; got 'fp8'"),
        (["--lora-format", "diffusers,onnx"], "error: --lora-format: expected a comma-separated subset of diffusers, comfyui"),
        (["--private"], "error: --private needs --push-to-hub"),
        (["--bogus"], "error: unrecognized arguments: --bogus"),
        (["--push-to-hub", "a/b/c"], "error: --push-to-hub: expected a repo id like 'user/name', got 'a/b/c'"),
        (["--lora-format", "none"], "error: --lora-format none without --merge leaves nothing to export"),
    ],
)
def test_cli_bad_arguments(wan: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str) -> None:
    code, err = run_cli(["--checkpoint", str(wan.run), "--output", str(tmp_path / "out"), *extra], capsys)
    assert code == 2
    assert len(err) == 1 and err[0].startswith(message), err
    assert not (tmp_path / "out").exists()


def test_non_empty_output_via_cli(wan: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("x")
    code, err = run_cli(["--checkpoint", str(wan.run), "--output", str(tmp_path / "out")], capsys)
    assert code == 2 and err == [f"error: --output: {tmp_path / 'out'} is not empty; pass --force to replace it"]
    code, err = run_cli(["--checkpoint", str(wan.run), "--output", str(tmp_path / "out"), "--force"], capsys)
    assert code == 0 and err == []
    assert (tmp_path / "out" / exporting.LORA_FILE).is_file() and (tmp_path / "out" / exporting.COMFYUI_FILE).is_file()


def test_force_never_replaces_the_run_being_exported(case: Case) -> None:
    final = case.run / "final"
    for source in (case.run, final):
        for target in (final, case.run, case.run.parent):
            with pytest.raises(ValueError, match="would replace the run being exported"):
                exporting.export_checkpoint(source, target, force=True, log=lambda _: None)
    assert (final / "weights" / "lora.safetensors").is_file() and (case.run / "checkpoints").is_dir()
