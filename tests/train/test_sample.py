"""sample.py: the family's diffusers pipeline with the sparse attention swapped in, written to a playable mp4."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from train import sampling
from train.attention import METHODS
from train.config_schema import AttentionConfig

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_wan(tmp_path_factory: pytest.TempPathFactory) -> str:
    pytest.importorskip("train.models.wan")
    from train.models.wan import WanAdapter

    return WanAdapter.save_tiny_random(str(tmp_path_factory.mktemp("sample") / "tiny-wan"), seed=0)


def decode(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def opts(model: str, out: Path, *, attention: str = "radial", dense_layers: int = 0, **kw) -> sampling.SampleOptions:
    base = dict(model=model, prompt="a red fox running through snow", out=str(out), frames=17, height=64, width=64,
                attention=AttentionConfig(type=attention, block_size=16, dense_layers=dense_layers), steps=3,
                guidance_scale=3.0, seed=0)
    base.update(kw)
    return sampling.SampleOptions(**base)


def test_radial_sampling_writes_a_playable_mp4(tiny_wan: str, tmp_path: Path) -> None:
    from sparse_attn import mask_density, radial_block_mask

    lines: list[str] = []
    res = sampling.generate(opts(tiny_wan, tmp_path / "v.mp4", dense_steps=1, dense_layers=1), log=lines.append)
    video = decode(tmp_path / "v.mp4")
    assert video.shape == (17, 64, 64, 3) and res.num_frames == 17 and res.family == "wan"
    assert video.std() > 1.0  # not a blank clip
    assert [p.name for p in tmp_path.iterdir()] == ["v.mp4"]  # the temp file was renamed
    # the first step ran dense (no sparse call), the others used Wan's radial mask: 17 frames -> 5 latent frames of
    # (64/8/2)^2 = 16 tokens, block 16 -> the 5x5 block mask of the official rule
    expected = mask_density(radial_block_mask(5, 16, block_size=16, model="wan"), block_size=16)
    assert expected < 0.5
    assert res.step_dense == [True, False, False]
    assert res.step_density[0] == 1.0
    assert res.step_density[1:] == pytest.approx([expected, expected])
    assert len(res.step_seconds) == 3 and all(t > 0 for t in res.step_seconds)
    text = "\n".join(lines)
    assert "step 1/3" in text and "(dense step)" in text and f"density {expected:.3f}" in text
    assert "mean time per step" in text and f"attention density: {expected:.3f}" in text


@pytest.mark.parametrize("family", ["hunyuan_video", "mochi"])
def test_other_families_sample_with_radial_attention(family: str, tmp_path: Path) -> None:
    pytest.importorskip(f"train.models.{family}")
    from train.models import get_adapter

    cls = get_adapter(family)
    tiny = cls.save_tiny_random(str(tmp_path / "tiny"), seed=0)
    frames = cls.frame_multiple * 2 + 1
    res = sampling.generate(opts(tiny, tmp_path / "v.mp4", frames=frames, steps=2, dense_steps=1, guidance_scale=None),
                            log=lambda _: None)
    assert res.family == family
    assert decode(res.path).shape == (frames, 64, 64, 3)
    assert res.step_dense == [True, False] and res.step_density[0] == 1.0 and res.step_density[1] < 1.0


def test_dense_steps_change_the_result_and_lora_loads(tiny_wan: str, tmp_path: Path) -> None:
    """Sparse and dense attention give different videos; a LoRA folder is loaded (and fused) through diffusers."""
    from diffusers import WanPipeline, WanTransformer3DModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    sparse = sampling.generate(opts(tiny_wan, tmp_path / "sparse.mp4", steps=2), log=lambda _: None)
    dense = sampling.generate(opts(tiny_wan, tmp_path / "dense.mp4", steps=2, attention="dense"), log=lambda _: None)
    assert dense.step_density == [1.0, 1.0] and sparse.sparse_density < 0.5
    a, b = decode(sparse.path).astype(float), decode(dense.path).astype(float)
    assert np.abs(a - b).mean() > 0.5

    transformer = WanTransformer3DModel.from_pretrained(tiny_wan, subfolder="transformer")
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)
    WanPipeline.save_lora_weights(str(tmp_path / "lora"), transformer_lora_layers=get_peft_model_state_dict(transformer))
    lines: list[str] = []
    with_lora = sampling.generate(opts(tiny_wan, tmp_path / "lora.mp4", steps=2, lora=str(tmp_path / "lora")), log=lines.append)
    assert any("loading LoRA" in line for line in lines)
    assert np.abs(decode(with_lora.path).astype(float) - a).mean() > 0.5


def test_transformer_override_and_write_video(tiny_wan: str, tmp_path: Path) -> None:
    # a folder with transformer/ (what export --merge writes) replaces the pipeline's transformer
    ref = sampling.generate(opts(tiny_wan, tmp_path / "a.mp4", steps=1), log=lambda _: None)
    same = sampling.generate(opts(tiny_wan, tmp_path / "b.mp4", steps=1, transformer=tiny_wan), log=lambda _: None)
    np.testing.assert_array_equal(decode(ref.path), decode(same.path))
    # write_video takes the pipelines' float [0, 1] frames
    frames = np.linspace(0, 1, 5 * 16 * 16 * 3, dtype=np.float32).reshape(5, 16, 16, 3)
    path = sampling.write_video(frames, tmp_path / "sub" / "w.mp4", fps=8)
    assert decode(path).shape == (5, 16, 16, 3)
    with pytest.raises(ValueError, match=r"expected \[F, H, W, 3\]"):
        sampling.write_video(np.zeros((5, 16, 16)), tmp_path / "x.mp4")


def test_family_resolution(tiny_wan: str, tmp_path: Path) -> None:
    assert sampling.resolve_family(tiny_wan) == "wan"
    with pytest.raises(ValueError, match="contradicts"):
        sampling.resolve_family(tiny_wan, "mochi")
    other = tmp_path / "sd"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ValueError, match="'StableDiffusionPipeline' is not supported"):
        sampling.resolve_family(str(other))
    # a Hub id that is not cached (tests run offline) needs --family
    with pytest.raises(ValueError, match="pass --family"):
        sampling.resolve_family("nobody-here/no-such-model-xyz")
    assert sampling.resolve_family("nobody-here/no-such-model-xyz", "hunyuan_video") == "hunyuan_video"


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    from train.cli import run_main

    spec = importlib.util.spec_from_file_location("_sample_cli", REPO / "train" / "sample.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)  # type: ignore[union-attr]
    try:
        code = run_main(lambda: cli.main(argv))
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--attention", "flash"], f"error: --attention: expected one of {', '.join(METHODS)}; got 'flash'"),
        (["--block-size", "8"], "error: --block-size: expected an integer >= 16, got 8"),
        (["--top-p", "1.5"], "error: --top-p: expected a value in (0, 1], got 1.5"),
        (["--kmeans-iters", "0"], "error: --kmeans-iters: expected null or an integer >= 1, got 0"),
        (["--attention-sink", "maybe"], "error: argument --attention-sink: expected true or false, got 'maybe'"),
        (["--frames", "0"], "error: --frames: expected a positive integer, got 0"),
        (["--dtype", "int8"], "error: --dtype: expected one of bf16, fp16, fp32; got 'int8'"),
        (["--out", "v.gif"], "error: --out: expected a .mp4 path"),
        (["--lora", "/no/such/lora"], "error: --lora: /no/such/lora does not exist"),
        (["--frames", "18"], "error: frames=18 is not of the form 4k+1"),
        (["--steps", "x"], "error: argument --steps: invalid int value: 'x'"),
    ],
)
def test_cli_bad_arguments(tiny_wan: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str) -> None:
    out = tmp_path / "v.mp4"
    code, err = run_cli(["--model", tiny_wan, "--prompt", "x", "--out", str(out), "--height", "64", "--width", "64", *extra], capsys)
    assert code == 2
    assert len(err) == 1 and err[0].startswith(message), err
    assert not out.exists()


def test_cli_attention_flags_are_the_recipe_keys() -> None:
    """Every AttentionConfig field is a flag of sample.py (--attention for type) with the schema's default, and the
    parsed flags are the sampler's AttentionConfig."""
    import dataclasses

    from train.attention.flags import attention_flag
    from train.sample import parse_args

    base = ["--model", "m", "--prompt", "p"]
    assert parse_args(base).attention == AttentionConfig()
    values = {"type": "svg2", "backend": "torch", "block_size": 64, "dense_layers": 2, "decay_factor": 0.5,
              "attention_sink": True, "num_q_clusters": 7, "num_k_clusters": 9, "top_p": 0.5, "min_kc_ratio": 0.25,
              "kmeans_iters": 3}
    assert set(values) == {f.name for f in dataclasses.fields(AttentionConfig)}
    argv = [x for name, value in values.items() for x in (attention_flag(name), str(value).lower())]
    assert parse_args(base + argv + ["--dense-steps", "4"]).attention == AttentionConfig(**values)
    assert attention_flag("type") == "--attention" and attention_flag("min_kc_ratio") == "--min-kc-ratio"


def test_cli_missing_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_cli(["--model", str(tmp_path / "nope"), "--prompt", "x"], capsys)
    assert code == 2 and err == [f"error: --model: {tmp_path / 'nope'} does not exist"]
