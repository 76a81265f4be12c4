"""Every command in README.md and docs/*.md: run as written when a CPU machine can run it, or listed with the
reason it cannot (real Hub weights, GPUs, several nodes) or the test that runs it.

The commands are read from the documents' fenced shell blocks (continuation lines joined, comments dropped), so a
command added or changed in the docs fails :func:`test_every_documented_command_is_accounted_for` until it is
classified here. Runnable ones run in a fresh copy of the repository (tracked and new files, the shipped configs
untouched, this checkout's .venv): the README's quickstart first, then the commands that use its outputs.
Templates (``<recipe>``, ``[--option]``) are filled by :func:`instantiate` from values listed next to them.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))]  # a new page is covered


def documented_commands(path: Path) -> list[str]:
    """Shell commands of the fenced blocks of ``path`` (bash/sh/unlabelled), one per logical line."""
    out = []
    for match in re.finditer(r"```(\w*)\n(.*?)```", path.read_text(), re.S):
        if match.group(1) not in ("", "bash", "sh"):
            continue
        for line in match.group(2).replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#\s.*$", "", line.strip())  # trailing comment
            if line and not line.startswith("#"):
                out.append(re.sub(r"\s+", " ", line))
    return out


def instantiate(template: str, values: dict[str, str], drop: tuple[str, ...] = ()) -> str:
    """A runnable command from a documented template: optional ``[...]`` groups starting with one of ``drop``
    are removed, the other brackets are opened, ``<placeholder>``s and bare placeholder words are replaced from
    ``values``, and ``a|b|c`` alternatives take the first."""
    text, out, depth, start = template, "", 0, 0
    groups, i = [], 0
    while i < len(text):  # find the top-level [...] groups (nested ones stay inside their parent)
        if text[i] == "[":
            if depth == 0:
                start = i
            depth += 1
        elif text[i] == "]":
            depth -= 1
            if depth == 0:
                groups.append((start, i))
        i += 1
    last = 0
    for s, e in groups:
        out += text[last:s]
        inner = text[s + 1:e]
        if not inner.startswith(drop) or not drop:
            out += instantiate(inner, values, drop) if "[" in inner else inner
        last = e + 1
    out += text[last:]
    for key, value in values.items():
        out = out.replace(key, value) if key.startswith("<") else re.sub(rf"(?<![\w-]){re.escape(key)}(?![\w-])", value, out)
    out = re.sub(r"(?<=\s)(\w+)(?:\|\w+)+(?=\s|$)", r"\1", out)  # bf16|fp16|fp32 -> bf16
    return re.sub(r"\s+", " ", out).strip()


# -- the inventory ---------------------------------------------------------------------------------------------
QS_SAMPLE = ('.venv/bin/python train/sample.py --model runs/quickstart/tiny-wan --lora runs/quickstart/export '
             '--prompt "a red square" --frames 33 --height 128 --width 128 --attention radial --block-size 16 '
             '--steps 4 --out qs.mp4')
EXPORT_README = ("python train/export.py --checkpoint runs/<run> --output exports/<name> --lora-format diffusers,comfyui "
                 "[--merge] [--dtype bf16] [--push-to-hub user/repo [--private]]")
EXPORT_DOCS = ("python train/export.py --checkpoint <run dir | checkpoint dir> --output <dir> [--merge] "
               "[--lora-format diffusers,comfyui] [--dtype bf16|fp16|fp32] [--push-to-hub <repo_id> [--private]] [--force]")
SAMPLE_DOCS_QS = ('python train/sample.py --model runs/quickstart/tiny-wan --lora runs/quickstart/export --prompt '
                  '"a red square" --frames 33 --height 128 --width 128 --attention radial --block-size 16 --steps 4 '
                  '--out /tmp/qs.mp4')
ACCEL_TEMPLATE = ("accelerate launch [--config_file configs/accelerate/<setup>.yaml] train/finetune.py --config "
                  "configs/<recipe>.yaml [section.key=value ...]")
LAUNCH_TEMPLATE = ("bash launch.sh train configs/<recipe>.yaml [--gpus N] [--zero 2|3] [--nodes N --node-rank R "
                   "--main-addr HOST] [key=value ...]")
PRECOMPUTE_TEMPLATE = ("accelerate launch [--num_processes N] train/precompute.py --config configs/<recipe>.yaml "
                       "data.cache_dir=cache/<name>")
SYNTHETIC = "python -m data.synthetic --out DIR --num-videos N --frames F --size HxW [--fps R]"  # inline in training.md
SHORT_RUN = "train.max_steps=2 train.checkpoint_every=2 validation.every_steps=0 export.at_end=false tracking.report_to=none"

GPU_OR_HUB = "real Hub weights at full size (GPU); the same command shapes run with tiny recipes in tests/test_launch.py"
EXCLUDED = {
    "bash launch.sh test": "runs this suite itself (CI runs it: .ci/run)",
    "accelerate launch --num_processes 8 train/precompute.py --config configs/wan2.1-t2v-1.3b_480p_radial_321f.yaml "
    "data.cache_dir=cache/wan321": GPU_OR_HUB,
    "accelerate launch train/finetune.py --config configs/wan2.1-t2v-1.3b_480p_radial_321f.yaml": GPU_OR_HUB,
    "bash launch.sh train configs/wan2.1-t2v-1.3b_480p_radial_321f.yaml": GPU_OR_HUB,
    "bash launch.sh train configs/wan2.1-t2v-1.3b_480p_radial_321f.yaml --gpus 8": GPU_OR_HUB,
    "bash launch.sh train configs/wan2.1-t2v-14b_720p_radial_161f.yaml --gpus 8 --zero 3": GPU_OR_HUB,
    "bash launch.sh train configs/hunyuanvideo_720p_radial_509f.yaml --gpus 8 --zero 3 --nodes 4 --node-rank "
    "$NODE_RANK --main-addr $MAIN_HOST": "several GPU nodes; " + GPU_OR_HUB,
    'python train/sample.py --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers --lora exports/<name> --prompt "..." --frames 321 '
    "--height 480 --width 832 --attention radial --dense-steps 2 --dense-layers 1 --out video.mp4": GPU_OR_HUB,
    'python train/sample.py --model <hub id | folder> [--lora <LoRA>] --prompt "..." --frames 321 --height 480 '
    "--width 832 --attention radial|svg2|dense [--dense-steps N --dense-layers M] [--steps S] [--guidance-scale G] "
    "[--seed S] --out video.mp4": "321 frames at 480x832 is a GPU job; its concrete quickstart instance runs here",
    "export MAIN=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n1)": "Slurm, several GPU nodes",
    "srun bash -c 'bash launch.sh train configs/hunyuanvideo_720p_radial_509f.yaml --gpus 8 --zero 3 --nodes "
    "$SLURM_NNODES --node-rank $SLURM_NODEID --main-addr '\"$MAIN\"": "Slurm, several GPU nodes",
    ".venv/bin/python -m pytest tests -m gpu -q": "the GPU tier (on CPU it only skips)",
}
RUN_HERE = {  # documented text -> the command this test runs (identical unless the text is a template)
    "bash launch.sh quickstart": "bash launch.sh quickstart",
    QS_SAMPLE: QS_SAMPLE,
    SAMPLE_DOCS_QS: SAMPLE_DOCS_QS,  # its --out /tmp/qs.mp4 is redirected into the copy (see below)
    EXPORT_README: instantiate(EXPORT_README, {"<run>": "quickstart", "<name>": "qs-readme"}, drop=("--push-to-hub",)),
    EXPORT_DOCS: instantiate(EXPORT_DOCS, {"<run dir | checkpoint dir>": "runs/quickstart", "<dir>": "exports/qs-docs"},
                             drop=("--push-to-hub",)),
    "bash launch.sh setup": "bash launch.sh setup",
    ACCEL_TEMPLATE: instantiate(ACCEL_TEMPLATE, {"<setup>": "single_gpu", "<recipe>": "quickstart",
                                                 "section.key=value ...": f"train.output_dir=runs/qs-accelerate {SHORT_RUN}"}),
    LAUNCH_TEMPLATE: instantiate(LAUNCH_TEMPLATE, {"<recipe>": "quickstart", "N": "1",
                                                   "key=value ...": f"train.output_dir=runs/qs-launch {SHORT_RUN}"},
                                 drop=("--nodes",)),
    PRECOMPUTE_TEMPLATE: instantiate(PRECOMPUTE_TEMPLATE, {"N": "1", "<recipe>": "quickstart", "<name>": "qs"}),
}
BENCHMARKS = "GPU benchmark (docs/benchmarks.md)"


def _classified(command: str, path: str) -> bool:
    return command in EXCLUDED or command in RUN_HERE or path == "docs/benchmarks.md"


def test_every_documented_command_is_accounted_for() -> None:
    found = {(doc, c) for doc in DOCS for c in documented_commands(ROOT / doc)}
    assert found, "no commands found: did the fence syntax change?"
    unclassified = sorted(f"{doc}: {c}" for doc, c in found if not _classified(c, doc))
    assert not unclassified, "classify these documented commands in tests/test_docs_commands.py:\n" + "\n".join(unclassified)
    documented = {c for _, c in found}
    stale = sorted(c for c in (*EXCLUDED, *RUN_HERE) if c not in documented)
    assert not stale, "no longer in the docs:\n" + "\n".join(stale)
    assert SYNTHETIC.replace("\\", "") in (ROOT / "docs/training.md").read_text().replace("`", "")


def test_instantiate_fills_templates() -> None:
    assert RUN_HERE[LAUNCH_TEMPLATE] == (
        f"bash launch.sh train configs/quickstart.yaml --gpus 1 --zero 2 train.output_dir=runs/qs-launch {SHORT_RUN}")
    assert RUN_HERE[EXPORT_DOCS] == ("python train/export.py --checkpoint runs/quickstart --output exports/qs-docs "
                                     "--merge --lora-format diffusers,comfyui --dtype bf16 --force")
    assert RUN_HERE[PRECOMPUTE_TEMPLATE] == ("accelerate launch --num_processes 1 train/precompute.py --config "
                                             "configs/quickstart.yaml data.cache_dir=cache/qs")


# -- running them ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh copy of the repository (what git tracks plus new files), sharing this checkout's .venv."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    root = tmp_path_factory.mktemp("clone") / "repo"
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, root / name)
    (root / ".venv").symlink_to((ROOT / ".venv").resolve())
    return root


def _shell(clone: Path, command: str, timeout: int = 1200) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{clone / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "2",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache/torch_extensions"))}
    proc = subprocess.run(["bash", "-c", command], cwd=clone, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{command}\nexit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.fixture(scope="module")
def quickstart(clone: Path) -> Path:
    proc = _shell(clone, RUN_HERE["bash launch.sh quickstart"])
    run = clone / "runs" / "quickstart"
    assert "done." in proc.stdout and (run / "final" / "weights" / "lora.safetensors").is_file()
    assert (run / "export" / "pytorch_lora_weights.safetensors").is_file()
    return run


def _video_frames(path: Path) -> int:
    import av

    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


@pytest.mark.slow
def test_readme_quickstart_then_sample(clone: Path, quickstart: Path) -> None:
    _shell(clone, RUN_HERE[QS_SAMPLE])
    assert _video_frames(clone / "qs.mp4") == 33


@pytest.mark.slow
def test_docs_export_sample_command(clone: Path, quickstart: Path, tmp_path: Path) -> None:
    out = tmp_path / "qs.mp4"  # the page writes /tmp/qs.mp4; a test does not write over a user's file there
    _shell(clone, RUN_HERE[SAMPLE_DOCS_QS].replace("/tmp/qs.mp4", shlex.quote(str(out))))
    assert _video_frames(out) == 33


@pytest.mark.slow
@pytest.mark.parametrize("template, out", [(EXPORT_README, "exports/qs-readme"), (EXPORT_DOCS, "exports/qs-docs")])
def test_export_commands(clone: Path, quickstart: Path, template: str, out: str) -> None:
    _shell(clone, RUN_HERE[template])
    folder = clone / out
    assert (folder / "pytorch_lora_weights.safetensors").is_file() and (folder / "lora_comfyui.safetensors").is_file()
    assert (folder / "transformer").is_dir()  # --merge


@pytest.mark.slow
def test_launch_setup_returns_at_once_on_a_working_venv(clone: Path) -> None:
    _shell(clone, RUN_HERE["bash launch.sh setup"], timeout=120)


@pytest.mark.slow
def test_training_page_launch_commands(clone: Path, quickstart: Path) -> None:
    """accelerate launch with a shipped accelerate config, launch.sh with --zero 2 and precompute, on the
    quickstart recipe (its model and videos exist once the quickstart ran)."""
    for template, run in ((ACCEL_TEMPLATE, "runs/qs-accelerate"), (LAUNCH_TEMPLATE, "runs/qs-launch")):
        _shell(clone, RUN_HERE[template])
        assert (clone / run / "final" / "weights" / "lora.safetensors").is_file(), template
    _shell(clone, RUN_HERE[PRECOMPUTE_TEMPLATE])
    assert (clone / "cache" / "qs" / "manifest.json").is_file()


@pytest.mark.slow
def test_synthetic_data_command(clone: Path) -> None:
    command = instantiate(SYNTHETIC, {"DIR": "syn", "N": "2", "F": "9", "HxW": "32x48", "R": "8"})
    assert command == "python -m data.synthetic --out syn --num-videos 2 --frames 9 --size 32x48 --fps 8"
    _shell(clone, command, timeout=300)
    assert len(list((clone / "syn").rglob("*.mp4"))) == 2
