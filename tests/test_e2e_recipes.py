"""benchmarks/e2e_recipes.py (the GPU end-to-end script) with --tiny on CPU: every phase of a row - pipeline
folder, synthetic clips, launch.sh train with the shipped DeepSpeed files and a latent cache, resume, export,
the exported LoRA loaded into the family's diffusers pipeline - and its table row."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = [sys.executable, "benchmarks/e2e_recipes.py"]


def _run(*args: str, timeout: int = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache/torch_extensions"))}
    return subprocess.run([*SCRIPT, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_rows_are_listed_and_unknown_rows_refused() -> None:
    listed = _run("--list")
    assert listed.returncode == 0
    for name in ("wan13b-321f-1gpu", "wan13b-321f-sp2", "wan14b-720p-161f-z3-2gpu", "hunyuan-720p-253f-z3-2gpu",
                 "mochi-480p-325f-1gpu"):
        assert name in listed.stdout
    bad = _run("--rows", "wan99")
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: --rows takes names from")


@pytest.mark.slow
def test_tiny_hunyuan_row_zero3_sequence_parallel_end_to_end(tmp_path: Path) -> None:
    table = tmp_path / "e2e.md"
    proc = _run("--rows", "hunyuan-720p-253f-z3-2gpu", "--tiny", "--work", str(tmp_path / "work"), "--out", str(table),
                "--port", "29561", timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    row = table.read_text().splitlines()[-1]
    assert row.startswith("| hunyuan-720p-253f-z3-2gpu (tiny) | `hunyuan_video_720p_radial_253f.yaml`".replace(
        "hunyuan_video", "hunyuanvideo")), row
    assert "--gpus 2 --zero 3, SP 2" in row and " finite |" in row and "| ok (" in row
    delta = float(re.search(r"Δ ([0-9.e+-]+)\)", row).group(1))
    assert delta < 1e-4  # the resumed step 2 repeats the uninterrupted one
    work = tmp_path / "work"
    assert (work / "cache" / "hunyuan-720p-253f-z3-2gpu-tiny" / "manifest.json").is_file()  # trained from the latent cache
