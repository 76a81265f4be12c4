"""The shipped recipes end to end through ``bash launch.sh train``, at real scale, on GPUs.

Per row: a pipeline folder with the family's real transformer and VAE architectures (random weights) and text
encoders of the real output width but tiny depth (offline tokenizers); synthetic mp4 clips at the recipe's
resolution and length; then, through the README's launcher with the shipped accelerate / DeepSpeed files,
latent cache -> 2 training steps (a checkpoint after step 1, final/ after step 2) -> resume from the step-1 checkpoint (step 2 again,
its loss compared) -> ``train/export.py`` -> the exported LoRA loaded into the family's diffusers pipeline.
Each phase is idempotent and the work folder (``runs/e2e`` by default, ignored by git) persists between calls,
so a row can be run phase by phase within a 10-minute limit per call. The table row (step time, peak memory of
rank 0, losses finite, resume, export + load) is appended to ``--out``.

    python benchmarks/e2e_recipes.py --list
    python benchmarks/e2e_recipes.py --rows wan13b-321f-1gpu --out e2e.md                 # all phases
    python benchmarks/e2e_recipes.py --rows wan14b-720p-161f-z3-2gpu --phase build         # then train, resume, export
    python benchmarks/e2e_recipes.py --rows hunyuan-720p-253f-z3-2gpu --tiny --work /tmp/e2e  # CPU, tiny models

``--tiny`` runs the same phases with the families' tiny random models, small clips and the torch attention
backend (what the CPU test uses). Step 1 includes kernel compilation and autotuning, so the step time reported
is step 2's. The trainer logs rank 0's peak memory; under ZeRO-3 + sequence parallelism ranks are symmetric.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@dataclass(frozen=True)
class Row:
    name: str
    recipe: str
    model: str  # key of MODELS
    gpus: int
    zero: int | None = None
    sp: int = 1
    note: str = ""
    overrides: tuple[str, ...] = field(default_factory=tuple)


ROWS = {r.name: r for r in [
    Row("wan13b-321f-1gpu", "configs/wan2.1-t2v-1.3b_480p_radial_321f.yaml", "wan-1.3b", 1),
    Row("wan13b-321f-sp2", "configs/wan2.1-t2v-1.3b_480p_radial_321f.yaml", "wan-1.3b", 2, zero=3, sp=2),
    Row("wan14b-720p-161f-z3-2gpu", "configs/wan2.1-t2v-14b_720p_radial_161f.yaml", "wan-14b", 2, zero=3, sp=2),
    Row("hunyuan-720p-253f-z3-2gpu", "configs/hunyuanvideo_720p_radial_253f.yaml", "hunyuan", 2, zero=3, sp=2,
        note="13B at 230k video tokens: 1 GPU cannot hold the activations"),
    Row("mochi-480p-325f-1gpu", "configs/mochi1_480p_radial_325f.yaml", "mochi", 1),
]}

#: family, transformer config (the Hub release's; {} = the diffusers class defaults, which are the release's),
#: VAE config likewise, text encoder output width(s).
WAN_13B = dict(patch_size=[1, 2, 2], num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
               text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
               qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=1024)
MODELS = {
    "wan-1.3b": ("wan", WAN_13B),
    "wan-14b": ("wan", {}),  # WanTransformer3DModel defaults = Wan2.1-T2V-14B
    "hunyuan": ("hunyuan_video", {}),  # HunyuanVideoTransformer3DModel defaults = HunyuanVideo (13B)
    "mochi": ("mochi", {}),  # MochiTransformer3DModel defaults = Mochi 1 preview (10B)
}
TINY_CLIP = {"wan": (9, 64, 64), "hunyuan_video": (9, 64, 64), "mochi": (13, 64, 64)}  # frames, height, width
PHASES = ("build", "train", "resume", "export")


def log(msg: str) -> None:
    print(f"[e2e {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- build -----------------------------------------------------------------------------------------------------
def build_pipeline(model_key: str, out: Path, tiny: bool) -> None:
    """The family's tiny pipeline (tokenizers, scheduler), with the transformer and VAE replaced by the real
    architectures and the text encoders widened to the real output width (random weights, bf16 on disk)."""
    from train.models import get_adapter

    family, transformer_cfg = MODELS[model_key]
    adapter_cls = get_adapter(family)
    if tiny:
        adapter_cls.save_tiny_random(str(out), seed=0)
        return
    import torch

    from train.models.common import diffusers_class
    from train.tiny.pipeline import write_pipeline_atomically

    scratch = out.parent / f".{out.name}.tiny"
    shutil.rmtree(scratch, ignore_errors=True)
    adapter_cls.save_tiny_random(str(scratch), seed=0)
    pipe_cls = diffusers_class(adapter_cls.pipeline_class)
    tiny = pipe_cls.from_pretrained(str(scratch))
    parts = dict(tiny.components)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # a CPU init of 10B+ parameters takes minutes
        parts["transformer"] = diffusers_class(adapter_cls.transformer_class)(**transformer_cfg).to(torch.bfloat16)
        parts["vae"] = diffusers_class(adapter_cls.vae_class)()  # class defaults = the release's VAE
        parts.update(_wide_text_encoders(family, parts))
    for name, module in parts.items():
        if isinstance(module, torch.nn.Module):
            parts[name] = module.to("cpu", torch.bfloat16 if name != "vae" else torch.float32)
    write_pipeline_atomically(pipe_cls(**parts), out)
    shutil.rmtree(scratch, ignore_errors=True)


def _wide_text_encoders(family: str, parts: dict) -> dict:
    """Text encoders whose outputs have the real widths (T5/UMT5 and Llama 4096, CLIP-L 768), one or two layers."""
    if family in ("wan", "mochi"):
        enc = parts["text_encoder"]
        cfg = enc.config.to_dict()
        cfg.update(d_model=4096, d_kv=64, num_heads=2, d_ff=512, num_layers=1)
        return {"text_encoder": type(enc)(type(enc.config)(**cfg)).eval()}
    from train.tiny.text_encoders import tiny_clip_text_model, tiny_llama_model

    tok2 = parts["tokenizer_2"]
    return {
        "text_encoder": tiny_llama_model(len(parts["tokenizer"]), 4096, num_layers=2),  # hidden_states[-3] needs 2
        "text_encoder_2": tiny_clip_text_model(len(tok2), 768, bos_token_id=tok2.bos_token_id,
                                               eos_token_id=tok2.eos_token_id, pad_token_id=tok2.pad_token_id),
    }


def recipe_clip(recipe: str) -> tuple[int, int, int, float]:
    from train.config import load_config

    d = load_config(ROOT / recipe, []).data
    return d.frames, d.height, d.width, d.fps


# -- phases ----------------------------------------------------------------------------------------------------
class RowRun:
    def __init__(self, row: Row, work: Path, tiny: bool, port: int) -> None:
        self.row, self.tiny, self.port = row, tiny, port
        family = MODELS[row.model][0]
        self.family = family
        self.model_dir = work / "models" / (row.model + ("-tiny" if tiny else ""))
        frames, height, width, fps = recipe_clip(row.recipe)
        if tiny:
            frames, height, width = TINY_CLIP[family]
        self.clip = (frames, height, width, fps)
        self.data_dir = work / "data" / f"{frames}x{height}x{width}@{fps:g}"
        self.run_dir = work / "runs" / (row.name + ("-tiny" if tiny else ""))
        self.cache_dir = work / "cache" / (row.name + ("-tiny" if tiny else ""))
        self.export_dir = work / "exports" / (row.name + ("-tiny" if tiny else ""))

    def overrides(self) -> list[str]:
        frames, height, width, _ = self.clip
        o = [f"model.pretrained={self.model_dir}", f"data.path={self.data_dir}", f"data.cache_dir={self.cache_dir}",
             f"train.output_dir={self.run_dir}", "train.max_steps=2", "train.checkpoint_every=1",
             "train.checkpoints_keep=2", "train.log_every=1", "validation.every_steps=0", "export.at_end=false",
             "tracking.report_to=none", f"parallel.sequence_parallel_size={self.row.sp}", "data.num_workers=0",
             *self.row.overrides]
        if self.tiny:
            o += [f"data.frames={frames}", f"data.height={height}", f"data.width={width}", "attention.block_size=16",
                  "attention.backend=torch", "lora.rank=4", "lora.alpha=4", "attention.dense_layers=0"]
        return o

    def launch(self, *extra: str) -> None:
        cmd = ["bash", "launch.sh", "train", self.row.recipe, "--gpus", str(self.row.gpus), "--main-port", str(self.port)]
        if self.row.zero:
            cmd += ["--zero", str(self.row.zero)]
        cmd += self.overrides() + list(extra)
        log(" ".join(cmd))
        proc = subprocess.run(cmd, cwd=ROOT)
        # DeepSpeed now and then aborts at exit after a finished run: judge by what the run wrote
        if not (self.run_dir / "final" / "meta.json").is_file():
            raise SystemExit(f"{self.row.name}: launch.sh train failed (exit {proc.returncode})")

    def build(self) -> None:
        if not (self.model_dir / "model_index.json").is_file():
            log(f"building {self.model_dir}")
            build_pipeline(self.row.model, self.model_dir, self.tiny)
        if not (self.data_dir / "metadata.jsonl").is_file():
            from data.synthetic import write_synthetic_dataset

            frames, height, width, fps = self.clip
            log(f"writing 2 synthetic clips {frames}x{height}x{width} -> {self.data_dir}")
            write_synthetic_dataset(self.data_dir, 2, frames, height, width, fps, 0, workers=2)

    def train(self) -> None:
        if (self.run_dir / "final" / "meta.json").is_file() and (self.run_dir / "first_metrics.jsonl").is_file():
            return
        self.launch("train.overwrite_output_dir=true")
        shutil.copy(self.run_dir / "metrics.jsonl", self.run_dir / "first_metrics.jsonl")

    def resume(self) -> None:
        if (self.run_dir / "resumed_metrics.jsonl").is_file():
            return
        ckpts = sorted(c.name for c in (self.run_dir / "checkpoints").glob("checkpoint-*"))
        assert ckpts[-1:] == ["checkpoint-000001"], ckpts  # the last step writes final/, not a checkpoint
        (self.run_dir / "metrics.jsonl").unlink()
        self.launch("train.resume_from=latest")
        shutil.copy(self.run_dir / "metrics.jsonl", self.run_dir / "resumed_metrics.jsonl")

    def export(self) -> dict:
        if not (self.export_dir / "pytorch_lora_weights.safetensors").is_file():
            cmd = [sys.executable, "train/export.py", "--checkpoint", str(self.run_dir), "--output", str(self.export_dir),
                   "--lora-format", "diffusers", "--force"]
            log(" ".join(cmd))
            subprocess.run(cmd, cwd=ROOT, check=True)
        return load_exported_lora(self.family, self.model_dir, self.export_dir)


def load_exported_lora(family: str, model_dir: Path, export_dir: Path) -> dict:
    """The family's diffusers pipeline with the exported LoRA loaded: every LoRA factor of the file lands in the
    transformer, with the same values."""
    import torch
    from safetensors.torch import load_file

    from train.models import get_adapter
    from train.models.common import diffusers_class

    from train.models.common import dtype_kwarg

    pipe = diffusers_class(get_adapter(family).pipeline_class).from_pretrained(str(model_dir), **dtype_kwarg(torch.bfloat16))
    pipe.load_lora_weights(str(export_dir), adapter_name="e2e")
    state = load_file(str(export_dir / "pytorch_lora_weights.safetensors"))
    loaded = {n: p for n, p in pipe.transformer.named_parameters() if ".e2e." in n or n.endswith(".e2e.weight")}
    file_sum = sum(float(t.float().abs().sum()) for t in state.values())
    loaded_sum = sum(float(p.float().abs().sum()) for p in loaded.values())
    ok = len(loaded) == len(state) and math.isclose(file_sum, loaded_sum, rel_tol=1e-2)
    return {"lora_tensors": len(state), "loaded": len(loaded), "ok": ok,
            "adapters": pipe.get_list_adapters().get("transformer", [])}


# -- report ----------------------------------------------------------------------------------------------------
def metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


HEADER = ("| row | recipe | GPUs | launch | step s (step 2) | peak GB (rank 0) | losses | resumed step 2 | export + load |\n"
          "|---|---|---|---|---|---|---|---|---|\n")


def table_row(run: RowRun, loaded: dict | None) -> str:
    first, resumed = metrics(run.run_dir / "first_metrics.jsonl"), metrics(run.run_dir / "resumed_metrics.jsonl")
    losses = [m["loss"] for m in first]
    finite = bool(losses) and all(math.isfinite(x) for x in losses)
    step = f"{first[-1]['step_time_s']:.2f}" if first else "-"
    peak = f"{max(m.get('peak_memory_gb', 0.0) for m in first):.1f}" if first else "-"
    if resumed and len(losses) >= 2:
        r = resumed[-1]["loss"]
        res = f"{r:.5f} vs {losses[1]:.5f} (Δ {abs(r - losses[1]):.1e})"
    else:
        res = "-"
    row = run.row
    launch = f"--gpus {row.gpus}" + (f" --zero {row.zero}" if row.zero else "") + (f", SP {row.sp}" if row.sp > 1 else "")
    exp = "-" if loaded is None else (f"ok ({loaded['loaded']}/{loaded['lora_tensors']} tensors)" if loaded["ok"]
                                      else f"FAILED ({loaded['loaded']}/{loaded['lora_tensors']})")
    loss_text = (", ".join(f"{x:.4f}" for x in losses) + (" finite" if finite else " NOT FINITE")) if losses else "-"
    name = row.name + (" (tiny)" if run.tiny else "")
    return f"| {name} | `{Path(row.recipe).name}` | {row.gpus} | {launch} | {step} | {peak} | {loss_text} | {res} | {exp} |\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="", help="comma-separated row names (see --list)")
    p.add_argument("--phase", default="all", help=f"all, or comma-separated phases of {', '.join(PHASES)} "
                   "(each is idempotent)")
    p.add_argument("--work", default=str(ROOT / "runs" / "e2e"), help="models, clips, caches, runs, exports")
    p.add_argument("--out", default=None, help="markdown table file to append the row to (after export)")
    p.add_argument("--tiny", action="store_true", help="tiny models and clips (CPU): the same phases, small")
    p.add_argument("--port", type=int, default=29517)
    p.add_argument("--list", action="store_true")
    args = p.parse_args(argv)
    if args.list:
        for r in ROWS.values():
            print(f"{r.name:28s} {r.recipe}  --gpus {r.gpus}" + (f" --zero {r.zero}" if r.zero else "")
                  + (f" SP {r.sp}" if r.sp > 1 else "") + (f"  ({r.note})" if r.note else ""))
        return 0
    names = [n for n in args.rows.split(",") if n]
    unknown = [n for n in names if n not in ROWS]
    if not names or unknown:
        print(f"error: --rows takes names from {', '.join(ROWS)}; got {args.rows!r}", file=sys.stderr)
        return 2
    phases = PHASES if args.phase == "all" else tuple(x for x in args.phase.split(",") if x)
    if not phases or any(x not in PHASES for x in phases):
        print(f"error: --phase takes all or phases from {', '.join(PHASES)}; got {args.phase!r}", file=sys.stderr)
        return 2
    for name in names:
        run = RowRun(ROWS[name], Path(args.work).resolve(), args.tiny, args.port)
        loaded = None
        for phase in phases:
            log(f"{name}: {phase}")
            result = getattr(run, phase)()
            if phase == "export":
                loaded = result
                log(f"{name}: exported LoRA in {ROWS[name].model} pipeline: {result}")
        line = table_row(run, loaded)
        print(HEADER + line, end="")
        if args.out and loaded is not None:
            out = Path(args.out)
            if not out.is_file():
                out.write_text(HEADER)
            with out.open("a") as f:
                f.write(line)
        if loaded is not None and not loaded["ok"]:
            return 1
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
