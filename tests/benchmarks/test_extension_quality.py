"""The length-extension quality benchmark (benchmarks/extension_quality.py): its pieces against independent
references, and its --tiny mode end to end on the CPU (that every method ran and every number is finite; the
numbers' quality is the GPU run's business)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.ext_quality import metrics
from benchmarks.ext_quality.scenes import PixelLatent, make_scenes

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = "benchmarks/extension_quality.py"


@pytest.fixture(scope="module")
def scenes():
    return make_scenes(6, 12, 32, 32, seed=3)


def test_scenes_are_data_synthetic_renders_with_their_ground_truth(scenes):
    from data.synthetic import render_frames

    assert scenes.pixels.shape == (6, 12, 32, 32, 3) and scenes.pixels.dtype == torch.uint8
    again = render_frames(scenes.scenes[2], 12, 32, 32, seed=3 * 100003 + 2)
    assert np.array_equal(scenes.pixels[2].numpy(), again)
    shape = scenes.scenes[2].shapes[0]
    assert torch.allclose(scenes.centres[2, 0], torch.tensor(shape.start))
    assert torch.allclose(scenes.centres[2, -1], torch.tensor(shape.end))
    assert all(len(s.shapes) == 1 for s in scenes.scenes)


def test_pixel_latent_is_exactly_invertible(scenes):
    latent = PixelLatent.fit(scenes.pixels, 2)
    z = latent.encode(scenes.pixels[:3])
    assert z.shape == (3, 12, 12, 16, 16)
    assert abs(float(z.mean())) < 0.2 and 0.5 < float(z.std()) < 2.0  # normalised like a VAE latent
    assert torch.equal(latent.decode(z), scenes.pixels[:3])
    # channel c*4 + (dy*2 + dx) of latent pixel (i, j) is RGB channel c of pixel (2i + dy, 2j + dx)
    x = (scenes.pixels[0, 5].float() / 127.5 - 1 - torch.tensor(latent.mean)) / torch.tensor(latent.std)
    assert torch.allclose(z[0, 1 * 4 + 3, 5, 7, 9], x[2 * 7 + 1, 2 * 9 + 1, 1], atol=1e-6)


def test_detector_finds_the_object_where_the_scene_put_it(scenes):
    centres, found = metrics.detect_centres(scenes.pixels, scenes.colours, scenes.backgrounds)
    assert bool(found.all())
    err = metrics.position_error(centres, scenes.centres)
    assert float(err.max()) < 0.04 and float(err.mean()) < 0.015, (err.max(), err.mean())  # ~1 px of 32
    # a frame without the object: not found, frame centre
    blank = scenes.pixels.clone()
    blank[:] = scenes.backgrounds.to(torch.uint8)[:, None, None, None, :]
    centres, found = metrics.detect_centres(blank, scenes.colours, scenes.backgrounds)
    assert not bool(found.any()) and torch.allclose(centres, torch.full_like(centres, 0.5))


def test_psnr_ssim_against_direct_formulas(scenes):
    a = scenes.pixels[:2]
    assert torch.allclose(metrics.ssim(a, a), torch.ones(2, 12), atol=1e-5)
    assert float(metrics.psnr(a, a).min()) == pytest.approx(100.0)
    b = (a.int() + 5).clamp(0, 255).to(torch.uint8)
    mse = ((a.double() - b.double()) ** 2).mean((-3, -2, -1))
    assert torch.allclose(metrics.psnr(a, b).double(), 10 * torch.log10(255.0**2 / mse), atol=1e-4)
    noisy = (a.float() + 40 * torch.randn(a.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 255).to(torch.uint8)
    assert float(metrics.ssim(a, noisy).mean()) < 0.9


def test_attention_flops_is_the_kernels_md_convention():
    # 4 B H N^2 D density, x 3.5 fwd+bwd: the Wan 81 x 1560 row of docs/benchmarks.md (162.7 ms at 395 TFLOP/s)
    flops = metrics.attention_flops(1, 12, 126360, 128, 1, 0.187)
    assert flops / 0.1627 / 1e12 == pytest.approx(395, rel=0.01)
    assert metrics.attention_flops(2, 4, 100, 64, 3, 1.0, train=False) == 4 * 2 * 4 * 100**2 * 64 * 3
    with pytest.raises(ValueError):
        metrics.attention_flops(1, 1, 1, 1, 1, 1.5)


def test_minutes_budget_picks_steps_that_fit():
    from benchmarks.extension_quality import PRESETS, Plan, choose_steps

    plan = Plan(**{**PRESETS["default"], "minutes": 6.0})
    times = {"base": 0.03}
    for length in plan.lengths:
        for attention in ("dense", "radial", "svg2"):
            for mode in ("lora", "full"):
                times[f"{length}/{attention}/{mode}"] = 0.02 * length / plan.base_frames
    base, ft = choose_steps(plan, times, 60.0, lambda _: None)
    training = base * times["base"] + ft * sum(v for k, v in times.items() if k != "base")
    assert base >= 50 and ft >= 10
    assert training * 1.3 < 300.0  # within the 5 minutes left
    with pytest.raises(Exception, match="--minutes"):
        choose_steps(Plan(**{**PRESETS["default"], "minutes": 1.0}), times, 59.0, lambda _: None)


def test_a_failing_run_is_recorded_and_the_others_go_on():
    from benchmarks.extension_quality import _attempt

    result, lines = {"runs": [], "failed": []}, []

    def boom():
        raise RuntimeError("Triton compile failed\nlong trace")

    _attempt(result, lines.append, "32f radial full", boom)
    assert result["failed"] == [{"run": "32f radial full", "error": "RuntimeError: Triton compile failed"}]
    assert result["runs"] == [] and "FAILED" in lines[0]


def _run(*args: str, timeout: int = 400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_tiny_mode_runs_every_method_and_writes_table_plot_json(tmp_path):
    out = tmp_path / "out"
    proc = _run("--tiny", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())
    assert result["failed"] == [] and result["skipped"] == [] and result["partial"] is False
    plan = result["plan"]
    lengths = [plan["base_frames"] * m for m in plan["multipliers"]]
    assert lengths == [4, 8]
    runs = {(r["length"], r["attention"], r["mode"]): r for r in result["runs"]}
    assert set(runs) == {(l, a, m) for l in lengths for a in ("dense", "radial", "svg2") for m in ("none", "lora", "full")}
    for key, r in runs.items():
        for name in ("loss", "pos_err", "pos_err_last", "psnr", "ssim", "density", "found"):
            assert math.isfinite(r[name]), (key, name, r[name])
        if r["mode"] != "none":
            assert r["steps"] == plan["ft_steps"] and not r["diverged"]
            assert math.isfinite(r["step_ms"]) and r["step_ms"] > 0 and r["attn_tflop_step"] > 0
            assert len(r["curve"]) >= 2 and all(math.isfinite(c[2]) for c in r["curve"])
        assert len(r["pos_err_per_frame"]) == r["length"] - plan["base_frames"]
    for l in lengths:  # the router really ran the sparse paths (a dense fallback would report density 1)
        assert runs[(l, "dense", "lora")]["density"] == 1.0
        assert runs[(l, "radial", "lora")]["density"] < 0.5
        assert 0 < runs[(l, "svg2", "full")]["density"] <= 1.0
        assert runs[(l, "dense", "lora")]["trainable_params"] < runs[(l, "dense", "full")]["trainable_params"]
        # fine-tuning changed the model: its held-out loss differs from the untouched base's
        assert runs[(l, "dense", "full")]["loss"] != runs[(l, "dense", "none")]["loss"]
        assert result["detector_error_on_truth"][str(l)] < 0.03
    assert math.isfinite(result["base"]["loss"]) and result["base"]["steps"] == plan["base_steps"]
    md = (out / "results.md").read_text()
    assert "## 2F = 4 frames" in md and "## 4F = 8 frames" in md and "FT svg2 full" in md and "static" in md
    assert "## 4F = 8 frames" in proc.stdout  # the table is printed too
    png = out / "loss_vs_wallclock.png"
    try:
        import PIL  # noqa: F401
    except ImportError:
        assert "plot skipped" in proc.stdout
    else:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*tmp*"))  # nothing half-written left behind


def test_refuses_a_non_empty_out_and_bad_sizes(tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    proc = _run("--tiny", "--out", str(out), timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip().splitlines()[-1]]
    assert proc.stderr.startswith("error: --out") and "--force" in proc.stderr
    assert (out / "mine.txt").read_text() == "keep" and sorted(p.name for p in out.iterdir()) == ["mine.txt"]
    proc = _run("--tiny", "--size", "30", "--out", str(tmp_path / "new"), timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --size 30") and not (tmp_path / "new").exists()
