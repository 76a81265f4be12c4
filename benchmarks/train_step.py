"""Training-step speed measured through the real Trainer (the ``train/finetune.py`` code path).

Every row is one ``train.trainer.Trainer`` run of a shipped recipe (Wan2.1-T2V-1.3B 480p LoRA r128; optionally
HunyuanVideo 720p at its 2x recipe length) on a real-architecture random-weight pipeline written here once, fed
from a latent cache (random latents and text embeddings of the real shapes, written with ``data.cache``), so
the step is exactly what a user's run does after precompute: data loading, noise, forward through the family
adapter and router, loss, backward, clipping, AdamW. Step time, tokens/s and peak memory come from the
Trainer's own metrics.jsonl (median of the steps after ``--warmup`` warm-up steps, which compile and tune).

Attention rows: ``dense`` (SDPA with cuDNN first, then flash / efficient), ``flex`` (FlexAttention with a
BlockMask of the very same radial blocks, swapped in by a Trainer subclass), ``radial`` (ours, attention.backend
triton), ``radial-auto`` (ours, backend auto: FA4 where installed), ``svg2`` (ours, backend auto).
Step modes (the step-level work on its own): ``base`` = full gradient checkpointing, eager;
``policy`` = save_attention checkpointing; ``compile`` = regional torch.compile; ``both`` = the two together.

    python benchmarks/train_step.py --quick --out results.md      # the key comparison at 321 frames (~6 min, H200)
    python benchmarks/train_step.py --frames 81,161,321 --impls dense,flex,radial,radial-auto,svg2 --modes base,both
    python benchmarks/train_step.py --models hunyuan-720p --impls radial --modes both   # 13B: needs ~30 GB disk
    python benchmarks/train_step.py --tiny --impls dense,radial,svg2 --modes base,policy  # CPU smoke test, tiny Wan
    torchrun --nproc_per_node 2 benchmarks/train_step.py --sp 2 --frames 321 --impls radial --modes both  # Ulysses: one run
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WAN_1_3B = dict(  # Wan-AI/Wan2.1-T2V-1.3B-Diffusers transformer/config.json
    patch_size=[1, 2, 2], num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    eps=1e-6, image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=1024,
)
HUNYUAN = dict(  # hunyuanvideo-community/HunyuanVideo transformer/config.json
    in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
    num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1, qk_norm="rms_norm",
    guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768, rope_theta=256.0, rope_axes_dim=[16, 56, 56],
)


@dataclass(frozen=True)
class ModelSpec:
    """A benchmarked model: its recipe, the diffusers classes and configs of its random-weight pipeline, and the
    shapes of its cached text conditioning."""

    family: str
    recipe: str
    pipeline: str
    transformer: str
    transformer_config: dict
    vae: str
    vae_config: dict
    cond: dict  # name -> shape of one item (without batch); "mask:N" marks a [L] token mask with N valid tokens
    default_frames: tuple[int, ...]
    heads: int
    head_dim: int
    layers: int


MODELS = {
    "wan-1.3b": ModelSpec(
        "wan", "configs/wan2.1-t2v-1.3b_480p_radial_321f.yaml", "WanPipeline", "WanTransformer3DModel", WAN_1_3B,
        "AutoencoderKLWan", {"z_dim": 16, "scale_factor_temporal": 4, "scale_factor_spatial": 8},
        {"encoder_hidden_states": (512, 4096)}, (81, 161, 321), 12, 128, 30,
    ),
    "hunyuan-720p": ModelSpec(
        "hunyuan_video", "configs/hunyuanvideo_720p_radial_253f.yaml", "HunyuanVideoPipeline",
        "HunyuanVideoTransformer3DModel", HUNYUAN, "AutoencoderKLHunyuanVideo",
        {"latent_channels": 16, "temporal_compression_ratio": 4, "spatial_compression_ratio": 8, "scaling_factor": 0.476986},
        {"encoder_hidden_states": (256, 4096), "encoder_attention_mask": "mask:64", "pooled_projections": (768,),
         "guidance": ()}, (253,), 24, 128, 60,
    ),
}
IMPLS = {  # name -> attention overrides
    "dense": ["attention.type=dense"],
    "flex": ["attention.type=radial", "attention.backend=triton"],  # the router's radial call goes to FlexAttention
    "radial": ["attention.type=radial", "attention.backend=triton"],
    "radial-auto": ["attention.type=radial", "attention.backend=auto"],
    # the recipe keeps layer 0 dense (the official Wan rule); this row measures what that one layer costs
    "radial-auto-d0": ["attention.type=radial", "attention.backend=auto", "attention.dense_layers=0"],
    "svg2": ["attention.type=svg2", "attention.backend=auto"],  # the svg2 recipes' clusters: 100 / 500, top_p 0.9
}
MODES = {  # name -> (checkpoint_policy, compile)
    "base": ("full", False),
    "policy": ("save_attention", False),
    "compile": ("full", True),
    "both": ("save_attention", True),
}
#: --quick: Wan-1.3B LoRA r128 at 321 frames, the comparison of issue 12 (dense at its best step configuration).
#: Most important first (a --budget-s cut drops the last ones).
QUICK = [("radial", "both"), ("dense", "both"), ("flex", "both"), ("radial", "base"), ("flex", "base"),
         ("radial-auto", "both")]


# -- inputs: a random-weight pipeline and a latent cache ------------------------------------------------------


def write_pipeline(spec: ModelSpec, folder: Path, device: torch.device) -> str:
    """model_index.json, the transformer with random weights (bf16, initialised on ``device``) and the VAE's
    config (geometry only: with a latent cache the trainer loads no VAE or text encoder)."""
    import diffusers

    if (folder / "model_index.json").is_file():
        return str(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    cls = getattr(diffusers, spec.transformer)
    torch.manual_seed(0)
    with torch.device(device):  # random init on the GPU: a CPU init of billions of parameters takes minutes
        model = cls.from_config(spec.transformer_config).to(torch.bfloat16)
    model.save_pretrained(str(tmp / "transformer"), safe_serialization=True)
    del model
    (tmp / "vae").mkdir(parents=True)
    (tmp / "vae" / "config.json").write_text(json.dumps({"_class_name": spec.vae, **spec.vae_config}))
    (tmp / "model_index.json").write_text(json.dumps({
        "_class_name": spec.pipeline, "_diffusers_version": diffusers.__version__,
        "transformer": ["diffusers", spec.transformer], "vae": ["diffusers", spec.vae]}))
    tmp.rename(folder)
    return str(folder)


class _RandomClips(torch.utils.data.Dataset):
    """What ``data.cache.write_cache`` reads from a clip dataset, without videos: ids, one bucket, tiny pixels
    (the encoder below ignores them and returns latents of the real shape)."""

    def __init__(self, n: int, shape: tuple[int, int, int]) -> None:
        self.n, self.buckets = n, [shape]
        self.item_ids = [f"random-{i}" for i in range(n)]
        self.bucket_ids = [0] * n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, idx: Any) -> dict:
        i = idx[0] if isinstance(idx, tuple) else int(idx)
        return {"pixels": torch.zeros(3, 1, 1, 1), "caption": f"random clip {i}", "key": f"random-{i}", "index": i,
                "clip": 0, "bucket_index": 0, "bucket": self.buckets[0], "failed": []}

    @staticmethod
    def collate(items: list) -> dict:
        from data.dataset import collate_clips

        return collate_clips(items)


def write_cache(spec: ModelSpec, cfg: Any, adapter: Any, folder: Path, clips: int, cond_shapes: dict) -> str:
    """A finished latent cache for ``cfg.data`` (identity as the trainer checks it): random latents of the
    geometry's shape and random text conditioning of the family's shapes, bf16."""
    from data.cache import cache_identity
    from data.cache import write_cache as write

    if (folder / "manifest.json").is_file():
        return str(folder)
    g = adapter.geometry(cfg.data.frames, cfg.data.height, cfg.data.width)
    config = Path(cfg.model.pretrained) / "transformer" / "config.json"
    channels = int(json.loads(config.read_text())["in_channels"])
    gen = torch.Generator().manual_seed(0)

    def encode_videos(pixels: torch.Tensor) -> torch.Tensor:
        return torch.randn(pixels.shape[0], channels, g.latent_frames, g.latent_height, g.latent_width, generator=gen)

    def encode_prompts(prompts: list[str]) -> dict[str, torch.Tensor]:
        out = {}
        for name, shape in cond_shapes.items():
            if isinstance(shape, str):  # "mask:N": N valid tokens of the text length
                valid, length = int(shape.split(":")[1]), cond_shapes["encoder_hidden_states"][0]
                out[name] = (torch.arange(length) < valid).long().expand(len(prompts), length)
            elif name == "guidance":
                out[name] = torch.full((len(prompts),), 1000.0)
            else:
                out[name] = torch.randn(len(prompts), *shape, generator=gen)
        return out

    ident = cache_identity(cfg.data, model_id=cfg.model.pretrained, revision=cfg.model.revision, family=cfg.model.family,
                           dtype="bfloat16")
    write(folder, _RandomClips(clips, (cfg.data.frames, cfg.data.height, cfg.data.width)), encode_videos,
          encode_prompts, ident, overwrite=True)
    return str(folder)


# -- one run ---------------------------------------------------------------------------------------------------


def flex_trainer_class() -> type:
    """A Trainer whose router sends its radial calls to FlexAttention with a BlockMask of the same blocks."""
    from train.trainer import Trainer

    class FlexTrainer(Trainer):
        def _install_attention(self, run: Any) -> None:
            super()._install_attention(run)
            use_flex(run.router)

    return FlexTrainer


def use_flex(router: Any) -> None:
    """The router's radial calls through ``torch.compile(flex_attention)`` (the FlexAttention baseline): its radial
    method replaced by one that sends the same block mask to FlexAttention."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    from train.attention.methods.radial import RadialAttention

    compiled = torch.compile(flex_attention, dynamic=False)

    class FlexRadial(RadialAttention):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._block_masks: dict = {}

        def attend(self, q, k, v, call):  # noqa: ANN001 - AttentionMethod.attend
            mask, density = self.mask_and_density(call.geometry, call.text_tokens, q.device)
            n = q.shape[2]
            key = (mask.data_ptr(), n)
            if key not in self._block_masks:
                counts = mask.sum(-1, dtype=torch.int32)
                order = torch.argsort((~mask).to(torch.uint8), dim=-1, stable=True).to(torch.int32)
                zeros = torch.zeros_like(counts)
                self._block_masks[key] = BlockMask.from_kv_blocks(
                    zeros[None, None], order[None, None], counts[None, None], order[None, None],
                    BLOCK_SIZE=self.cfg.block_size, seq_lengths=(n, n))
            out = compiled(q, k, v, block_mask=self._block_masks[key])  # [B, H, N, D] views in and out
            return (out.transpose(1, 2) if call.bnhd else out), density

    router.method = FlexRadial(router.cfg, radial_rule=router.radial_rule)


@contextmanager
def dense_backends(device: torch.device) -> Iterator[None]:
    """SDPA tries cuDNN first, then flash and efficient attention (the 'dense (cuDNN)' baseline)."""
    if device.type != "cuda":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    try:
        ctx = sdpa_kernel(order, set_priority=True)
    except TypeError:  # torch without priorities: the listed backends, PyTorch's order
        ctx = sdpa_kernel(order)
    with ctx:
        yield


def reset_process_state() -> None:
    """Between runs in one process: accelerate's singletons, Dynamo's caches, the CUDA caching allocator."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def run_one(spec: ModelSpec, overrides: list[str], impl: str, mode: str, warmup: int, steps: int, work: Path,
            device: torch.device) -> dict:
    """One Trainer run of ``warmup + steps`` optimizer steps; the metrics of the timed ones."""
    from train.config import load_config
    from train.errors import UserError
    from train.trainer import Trainer

    policy, compile_ = MODES[mode]
    run_dir = work / f"run-{impl}-{mode}"
    cfg = load_config(str(ROOT / spec.recipe), [
        *IMPLS[impl], *overrides, f"train.checkpoint_policy={policy}", f"train.compile={str(compile_).lower()}",
        f"train.output_dir={run_dir}", f"train.max_steps={warmup + steps}", "train.overwrite_output_dir=true",
    ])
    reset_process_state()
    trainer_cls = flex_trainer_class() if impl == "flex" else Trainer
    row: dict[str, Any] = {"impl": impl, "mode": mode, "policy": policy, "compile": compile_}
    t0 = time.perf_counter()
    try:
        with dense_backends(device) if impl == "dense" else nullcontext():
            trainer = trainer_cls(cfg)
            trainer.run()
    except UserError as err:
        if not isinstance(err.__cause__, torch.cuda.OutOfMemoryError):
            raise
        shutil.rmtree(run_dir, ignore_errors=True)
        return {**row, "oom": True, "wall_s": time.perf_counter() - t0}
    row["wall_s"] = time.perf_counter() - t0
    if not trainer.is_main:  # the main process wrote the metrics
        return {**row, "step_s": float("nan")}
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = [m for m in metrics if m["step"] > warmup]
    row.update(
        step_s=statistics.median(m["step_time_s"] for m in timed),
        steps=[round(m["step_time_s"], 3) for m in metrics],
        tokens_per_s=statistics.median(m["tokens_per_s"] for m in timed),
        peak_gb=max(m.get("peak_memory_gb", float("nan")) for m in metrics),
        density=timed[-1]["attention_density"],
        compiled_blocks=trainer.step_speed["compiled_blocks"],
    )
    shutil.rmtree(run_dir, ignore_errors=True)
    return row


# -- the table -------------------------------------------------------------------------------------------------


def table(rows: list[dict]) -> str:
    head = ("| model | frames | tokens | attention | checkpointing | compile | density | step s | tokens/s | peak GB "
            "| x dense | x flex | x own base |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        name = f"| {r['model']} | {r['frames']} | {r.get('tokens', '-')} | {r['impl']} | {r['policy']} | " \
               f"{'on' if r['compile'] else 'off'} |"
        if r.get("oom") or r.get("skipped"):
            why = "OOM" if r.get("oom") else f"skipped ({r['skipped'][:80]})"
            lines.append(f"{name} - | {why} | - | - | - | - | - |")
            continue
        same = [x for x in rows if x["model"] == r["model"] and x["frames"] == r["frames"] and "step_s" in x]

        def ratio(impl: str, mode: str | None = None) -> str:
            ref = [x for x in same if x["impl"] == impl and (x["mode"] == (mode or r["mode"]))]
            if not ref and mode is None:  # no same-mode row: the best of that impl
                ref = sorted((x for x in same if x["impl"] == impl), key=lambda x: x["step_s"])[:1]
            return f"{ref[0]['step_s'] / r['step_s']:.2f}" if ref else "-"

        lines.append(f"{name} {r['density']:.3f} | {r['step_s']:.2f} | {r['tokens_per_s']:.0f} | {r['peak_gb']:.1f} | "
                     f"{ratio('dense')} | {ratio('flex')} | {ratio(r['impl'], 'base')} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="wan-1.3b", help=f"comma list of {sorted(MODELS)}")
    p.add_argument("--frames", default=None, help="comma list (default: the model's; Wan 81,161,321)")
    p.add_argument("--impls", default="dense,flex,radial,radial-auto,svg2", help=f"comma list of {list(IMPLS)}")
    p.add_argument("--modes", default="base,both", help=f"comma list of {list(MODES)}")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (compilation, autotuning)")
    p.add_argument("--steps", type=int, default=None, help="timed steps after the warm-up (default 2; --quick: 1)")
    p.add_argument("--quick", action="store_true", help="Wan-1.3B at 321 frames: " + ", ".join(f"{i}/{m}" for i, m in QUICK))
    p.add_argument("--budget-s", type=float, default=None, help="skip the runs that would start after this many seconds")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: the tiny random Wan, 9 frames of 32x32")
    p.add_argument("--sp", type=int, default=1, help="Ulysses group size = processes (launch with torchrun)")
    p.add_argument("--work", default=None, help="folder for the pipeline, caches and runs (default: a temp folder)")
    p.add_argument("--out", default=None, help="append the markdown table and JSON lines here")
    args = p.parse_args(argv)

    def bad(msg: str) -> None:
        print(f"error: {msg}", file=sys.stderr)
        raise SystemExit(2)

    models = args.models.split(",")
    for name, known in (("--models", MODELS), ("--impls", IMPLS), ("--modes", MODES)):
        values = {"--models": models, "--impls": args.impls.split(","), "--modes": args.modes.split(",")}[name]
        unknown = [v for v in values if v not in known]
        if unknown:
            bad(f"{name}: unknown {unknown}; expected some of {list(known)}")
    if args.steps is None:
        args.steps = 1 if args.quick else 2
    if args.warmup < 0 or args.steps < 1:
        bad("--warmup must be >= 0 and --steps >= 1")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.tiny:
        bad("no CUDA device: the real-size benchmark needs a GPU (use --tiny for the CPU smoke test)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.sp != world:
        bad(f"--sp {args.sp} needs as many processes (torchrun --nproc_per_node {args.sp}); this run has {world}")
    main_rank = int(os.environ.get("RANK", "0")) == 0
    if world > 1:  # the Trainer's accelerator reuses this group
        import torch.distributed as dist

        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    work = Path(args.work or (tempfile.mkdtemp(prefix="train-step-") if world == 1 else "/tmp/train-step-sp"))
    work.mkdir(parents=True, exist_ok=True)
    plan: list[tuple[str, int, str, str]] = []
    if args.quick:
        models = ["wan-1.3b"]
        plan = [("wan-1.3b", 321, impl, mode) for impl, mode in QUICK]
    else:
        for model in models:
            frames = [int(f) for f in args.frames.split(",")] if args.frames else list(MODELS[model].default_frames)
            if args.tiny:
                frames = [9]
            plan += [(model, f, impl, mode) for f in frames for impl in args.impls.split(",") for mode in args.modes.split(",")]
    if args.tiny:
        plan = [(m, f, i, mode) for m, f, i, mode in plan if i != "flex"]  # FlexAttention needs a GPU to be a baseline
    if world > 1 and len(plan) > 1:  # Trainer.run ends with accelerate's end_training, which destroys the group
        bad(f"with --sp, one run per torchrun call (one frame count, impl and mode); this asks for {len(plan)}")

    from train.step_speed import describe_memory

    rows: list[dict] = []
    start = time.perf_counter()
    prepared: dict[tuple[str, int], tuple[list[str], int]] = {}
    for model, frames, impl, mode in plan:
        spec = MODELS[model]
        row: dict[str, Any] = {"model": model, "frames": frames, "impl": impl, "mode": mode,
                               "policy": MODES[mode][0], "compile": MODES[mode][1]}
        if args.budget_s is not None and time.perf_counter() - start > args.budget_s:
            rows.append({**row, "skipped": "time budget"})
            print(json.dumps(rows[-1]), flush=True)
            continue
        if (model, frames) not in prepared:
            if main_rank:
                prepare(spec, model, frames, work, device, args.tiny)
            if world > 1:
                torch.distributed.barrier()
            prepared[(model, frames)] = prepare(spec, model, frames, work, device, args.tiny)  # already there: paths
            overrides, tokens = prepared[(model, frames)]
            if main_rank:
                print(describe_memory(tokens, spec.heads, spec.head_dim, spec.layers),
                      f"({model}, {frames} frames)", flush=True)
        overrides, tokens = prepared[(model, frames)]
        overrides = [*overrides, f"parallel.sequence_parallel_size={args.sp}"]
        try:
            result = run_one(spec, overrides, impl, mode, args.warmup, args.steps, work, device)
        except Exception as err:  # noqa: BLE001 - one failed row must not lose the others
            result = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"}
            rows.append({**row, "skipped": result["error"]})
            print(json.dumps(rows[-1]), flush=True)
            continue
        rows.append({**row, **result, "tokens": tokens, "gpus": world})
        if main_rank:
            print(json.dumps(rows[-1]), flush=True)
        if result.get("oom") and model == "hunyuan-720p":
            print(f"{model} at {frames} frames does not fit one {torch.cuda.get_device_name()} with {impl}/{mode}: "
                  "it needs sequence parallelism or ZeRO-3 over several GPUs (parallel.sequence_parallel_size)",
                  flush=True)
    if not main_rank:
        return
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (tiny smoke test)"
    gpu += f" x{world}" if world > 1 else ""
    from train.step_speed import compiled_regions_run_under_sac

    try:
        from sparse_attn.backends import fa4

        fa4_state = "installed" if fa4.installed() else "not installed (radial-auto = Triton)"
    except ImportError:
        fa4_state = "not available (radial-auto = Triton)"
    gpu += (f"; FA4 {fa4_state}; compiled blocks run inside selective checkpointing: "
            f"{'yes' if compiled_regions_run_under_sac() else 'NO (both = policy only)'}")
    text = (f"{gpu}; torch {torch.__version__}; {time.strftime('%Y-%m-%d')}; through train.trainer.Trainer, "
            f"median of {args.steps} step(s) after {args.warmup} warm-up step(s)\n\n" + table(rows))
    print(text, flush=True)
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(text + "\n\n" + "".join(json.dumps(r) + "\n" for r in rows) + "\n")
    failed = [r for r in rows if r.get("skipped", "time budget") != "time budget"]
    if failed:
        print(f"{len(failed)} run(s) failed: see the 'skipped' rows above", file=sys.stderr)
        raise SystemExit(1)


def prepare(spec: ModelSpec, model: str, frames: int, work: Path, device: torch.device, tiny: bool) -> tuple[list[str], int]:
    """Pipeline folder and latent cache for (model, frames); the recipe overrides that point the runs at them,
    and the video token count."""
    from train.config import load_config
    from train.models import get_adapter

    adapter_cls = get_adapter(spec.family)
    if tiny:
        folder = work / f"tiny-{model}"
        if not (folder / "model_index.json").is_file():
            adapter_cls.save_tiny_random(str(folder), seed=0)
        size = ["data.height=32", "data.width=32", "attention.block_size=16", "attention.backend=torch"]
        text_dim = json.loads((folder / "transformer" / "config.json").read_text())["text_dim"]
        cond_shapes = {"encoder_hidden_states": (16, text_dim)}
    else:
        folder = work / f"pipeline-{model}"
        write_pipeline(spec, folder, device)
        size = []
        cond_shapes = spec.cond
    cache = work / f"cache-{model}-{frames}"
    overrides = [f"model.pretrained={folder}", f"data.path={work / 'no-videos'}", f"data.cache_dir={cache}",
                 f"data.frames={frames}", "data.num_workers=0", "tracking.report_to=none", "validation.every_steps=0",
                 "train.checkpoint_every=1000000", "train.log_every=1", *size]
    if tiny:
        overrides += ["lora.rank=4", "lora.alpha=4", "attention.num_q_clusters=4", "attention.num_k_clusters=8"]
    cfg = load_config(str(ROOT / spec.recipe), overrides)
    adapter = adapter_cls(cfg.model.pretrained, dtype=torch.bfloat16)
    write_cache(spec, cfg, adapter, cache, clips=2, cond_shapes=cond_shapes)
    tokens = adapter.geometry(cfg.data.frames, cfg.data.height, cfg.data.width).video_tokens
    return overrides, tokens


if __name__ == "__main__":
    main()
