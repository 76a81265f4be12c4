"""Does fine-tuning with sparse attention extend videos as well as dense fine-tuning? (issue 15)

A controlled experiment that needs no downloads:

1. **Base model.** A small Wan-architecture transformer (diffusers ``WanTransformer3DModel``: Wan's patch
   embedding, 3-axis RoPE, QK-RMSNorm, text cross-attention) is trained from scratch with dense attention on
   captioned clips of ``data/synthetic.py`` scenes (one moving, spinning, colour-changing shape) of F frames.
2. **Extension.** Copies of it are fine-tuned to 2F and 4F frames with dense, radial and SVG2 attention, LoRA
   (peft, the project's default targets) and full, with the same batches, noise, seed, steps and learning rate
   per mode; the base model is also evaluated at 2F / 4F without fine-tuning (dense, and training-free radial /
   SVG2).
3. **Measures** on held-out scenes at the extended length: the flow-matching loss at fixed noise levels and
   fixed noise; and *continuation*: given the first F frames of a held-out clip, generate the rest (Euler
   sampler, ``FlowMatchEulerDiscreteScheduler``), decode it and compare with the scene's ground truth - the
   object's position error per frame (its centre is known from the scene's parameters), PSNR and SSIM. Plus
   each run's step time and self-attention FLOPs (``4 B H N^2 D x density``, x 3.5 for forward + backward).

Continuation needs a model that can take given frames: half of the training samples have their first k frames
clean at timestep 0 (per-token timesteps, the Wan2.2-TI2V conditioning ``WanTransformer3DModel`` supports; loss
on the other frames only); the other half is the trainer's text-to-video objective. ``--cond-prob 0`` trains
text-to-video only and continues by replacement (given frames re-noised to each step's level).

Attention goes through exactly what training uses: ``WanAdapter.install_attention`` -> ``WanSparseAttnProcessor``
-> ``AttentionRouter`` (dense SDPA, our Triton radial kernels, SVG2), bf16 autocast and backend ``auto`` on CUDA.
Noise levels, training pairs and predictions are the Wan adapter's. The latent space is an exact invertible
pixel fold (see ``ext_quality/scenes.py``), not a VAE. The training loop is a short one written here (not the
accelerate trainer) so that every run gets identical batches and noise and a clean per-step clock.

    python benchmarks/extension_quality.py --out runs/extension_quality                 # one GPU, ~14 min
    python benchmarks/extension_quality.py --minutes 6 --out runs/extension_quality     # same, fewer steps
    python benchmarks/extension_quality.py --tiny --out runs/extension_quality_tiny     # CPU smoke test

With ``--minutes`` (default 14 on a GPU) the step counts are chosen after timing a few steps of every run, so
the whole command fits the budget; ``--base-steps`` / ``--ft-steps`` fix them instead. Writes ``results.md``,
``results.json`` and ``loss_vs_wallclock.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

_T0 = time.perf_counter()
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.ext_quality import metrics, report  # noqa: E402
from benchmarks.ext_quality.scenes import PixelLatent, SceneSet, caption_corpus, default_workers, make_scenes  # noqa: E402
from train.errors import UserError  # noqa: E402

ATTENTIONS = ("dense", "radial", "svg2")
_NOISE_KINDS = {"loss": 1, "sample": 2}  # seeds of the fixed evaluation noise
MODES = ("lora", "full")


# ---------------------------------------------------------------------------------------------------------------
# configuration


@dataclass
class Plan:
    """Everything that defines one benchmark run (recorded in results.json)."""

    size: int  # frame height = width, pixels
    factor: int  # pixel fold of the latent (tokens cover factor * 2 pixels per side after Wan's 2x2 patch)
    base_frames: int  # F
    multipliers: tuple[int, ...]  # extended lengths = F x these
    layers: int
    heads: int
    head_dim: int
    ffn_dim: int
    freq_dim: int
    text_tokens: int
    batch: int  # fine-tuning batch (and eval batch)
    base_batch: int
    train_clips: int
    eval_clips: int  # held-out clips for the loss
    sample_clips: int  # held-out clips continued by sampling
    curve_clips: int  # held-out clips of the loss-vs-time curve
    curve_points: int
    base_steps: int
    ft_steps: int
    base_lr: float
    lr_full: float
    lr_lora: float
    lora_rank: int
    warmup_steps: int
    eval_sigmas: tuple[float, ...]
    sample_steps: int
    sample_dense_steps: int
    block_size: int
    decay_factor: float
    num_q_clusters: int
    num_k_clusters: int
    top_p: float
    dense_layers: int
    shift: float
    cond_prob: float  # share of training samples whose first frames are given clean (continuation)
    seed: int
    minutes: Optional[float]  # budget for the whole command; None: the step counts above are used as given
    base_share: float  # share of the training time given to the base model when --minutes picks the steps

    @property
    def lengths(self) -> list[int]:
        return [self.base_frames * m for m in self.multipliers]

    @property
    def longest(self) -> int:
        return max(self.lengths)

    @property
    def tokens_per_frame(self) -> int:
        return (self.size // self.factor // 2) ** 2


PRESETS: dict[str, dict[str, Any]] = {
    # One H200: 32 x 256 = 8192 tokens at 4F, where radial (block 64) keeps 36% of the blocks.
    "default": dict(
        size=64, factor=2, base_frames=8, multipliers=(2, 4), layers=4, heads=4, head_dim=64, ffn_dim=1024,
        freq_dim=256, text_tokens=48, batch=4, base_batch=16, train_clips=1024, eval_clips=16, sample_clips=8,
        curve_clips=4, curve_points=8, base_steps=3000, ft_steps=400, base_lr=5e-4, lr_full=1e-4, lr_lora=1e-3,
        lora_rank=32, warmup_steps=50, eval_sigmas=(0.1, 0.3, 0.5, 0.7, 0.9), sample_steps=24,
        sample_dense_steps=0, block_size=64, decay_factor=1.0, num_q_clusters=16, num_k_clusters=64, top_p=0.9,
        dense_layers=0, shift=1.0, cond_prob=0.5, seed=0, minutes=14.0, base_share=0.4,
    ),
    # CPU smoke test: every path runs (torch backends), numbers mean nothing.
    "tiny": dict(
        size=32, factor=2, base_frames=2, multipliers=(2, 4), layers=2, heads=2, head_dim=32, ffn_dim=128,
        freq_dim=32, text_tokens=40, batch=2, base_batch=4, train_clips=12, eval_clips=2, sample_clips=2,
        curve_clips=2, curve_points=2, base_steps=12, ft_steps=3, base_lr=1e-3, lr_full=1e-4, lr_lora=1e-3,
        lora_rank=4, warmup_steps=2, eval_sigmas=(0.3, 0.7), sample_steps=3, sample_dense_steps=0,
        block_size=16, decay_factor=1.0, num_q_clusters=4, num_k_clusters=8, top_p=0.9, dense_layers=0,
        shift=1.0, cond_prob=0.5, seed=0, minutes=None, base_share=0.4,
    ),
}


def build_plan(args: argparse.Namespace) -> Plan:
    values = dict(PRESETS["tiny" if args.tiny else "default"])
    for name in ("size", "factor", "base_frames", "layers", "heads", "head_dim", "ffn_dim", "batch", "base_batch",
                 "train_clips", "eval_clips", "sample_clips", "base_steps", "ft_steps", "sample_steps",
                 "block_size", "lora_rank", "seed", "minutes", "lr_full", "lr_lora", "base_lr", "dense_layers",
                 "decay_factor", "num_q_clusters", "num_k_clusters", "top_p", "shift", "sample_dense_steps",
                 "cond_prob"):
        value = getattr(args, name, None)
        if value is not None:
            values[name] = value
    if args.multipliers is not None:
        values["multipliers"] = tuple(args.multipliers)
    if args.base_steps is not None or args.ft_steps is not None:
        values["minutes"] = args.minutes  # explicit steps: no budget unless one is also given
    plan = Plan(**values)
    _check_plan(plan)
    return plan


def _check_plan(p: Plan) -> None:
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise UserError(msg)

    need(p.size % (2 * p.factor) == 0, f"--size {p.size} must be a multiple of 2 x --factor = {2 * p.factor}")
    need(all(m >= 2 for m in p.multipliers), f"--multipliers must all be >= 2, got {list(p.multipliers)}")
    need(p.eval_clips % p.batch == 0 and p.sample_clips % p.batch == 0,
         f"--eval-clips ({p.eval_clips}) and --sample-clips ({p.sample_clips}) must be multiples of --batch ({p.batch})")
    need(p.sample_clips <= p.eval_clips and p.curve_clips <= p.eval_clips,
         "--sample-clips must not exceed --eval-clips")
    need(p.base_frames >= 2, f"--base-frames must be >= 2 (continuation at F keeps F/2 frames), got {p.base_frames}")
    need(p.minutes is None or p.minutes > 0, f"--minutes must be > 0, got {p.minutes}")
    need(p.heads * p.head_dim >= 16, "--heads x --head-dim must be >= 16")
    need(0 < p.top_p <= 1, f"--top-p must be in (0, 1], got {p.top_p}")
    need(0 <= p.cond_prob <= 1, f"--cond-prob must be in [0, 1], got {p.cond_prob}")
    for name in ("base_steps", "ft_steps", "sample_steps", "batch", "base_batch", "train_clips", "layers", "heads",
                 "lora_rank", "num_q_clusters", "num_k_clusters"):
        need(getattr(p, name) >= 1, f"--{name.replace('_', '-')} must be >= 1, got {getattr(p, name)}")


# ---------------------------------------------------------------------------------------------------------------
# the model and the project's attention routing


def transformer_config(p: Plan, channels: int, text_dim: int) -> dict[str, Any]:
    """A small ``WanTransformer3DModel``: Wan2.1's layout (patch 1x2x2, QK-RMSNorm across heads, cross-attention
    norm, 1024-position RoPE table) at a few layers."""
    return dict(
        patch_size=(1, 2, 2), num_attention_heads=p.heads, attention_head_dim=p.head_dim, in_channels=channels,
        out_channels=channels, text_dim=text_dim, freq_dim=p.freq_dim, ffn_dim=p.ffn_dim, num_layers=p.layers,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None,
        rope_max_seq_len=1024,
    )


def config_folder(root: Path, config: dict[str, Any], factor: int) -> str:
    """A pipeline folder of configs only, so ``WanAdapter`` computes geometry for the pixel latent
    (temporal factor 1, spatial factor ``factor``) exactly as for a real checkpoint."""
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "WanPipeline", "_diffusers_version": "0.35.0",
        "transformer": ["diffusers", "WanTransformer3DModel"], "vae": ["diffusers", "AutoencoderKLWan"],
    }))
    vae = {"_class_name": "AutoencoderKLWan", "z_dim": config["in_channels"], "scale_factor_temporal": 1,
           "scale_factor_spatial": factor}
    for sub, cfg in (("transformer", {"_class_name": "WanTransformer3DModel", **config}), ("vae", vae)):
        (root / sub).mkdir()
        (root / sub / "config.json").write_text(json.dumps(cfg))
    return str(root)


@dataclass
class RunLog:
    losses: list[float] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)
    densities: list[float] = field(default_factory=list)
    curve: list[tuple[float, int, float]] = field(default_factory=list)  # (train seconds, step, held-out loss)
    diverged: bool = False

    def step_time(self, skip: int = 2) -> float:
        times = self.step_s[skip:] if len(self.step_s) > skip + 2 else self.step_s
        return statistics.median(times) if times else float("nan")


class Bench:
    """Data, model factory, training loop and evaluations of one benchmark invocation."""

    def __init__(self, plan: Plan, device: torch.device, workdir: Path, log) -> None:
        self.p, self.device, self.log = plan, device, log
        self.cuda = device.type == "cuda"
        from diffusers import WanTransformer3DModel  # noqa: F401  (fail early when diffusers is missing)

        from train.tiny.text_encoders import TINY_T5_SIZES
        from train.models.wan import WanAdapter

        p = plan
        t = time.perf_counter()
        workers = default_workers()
        self.train = make_scenes(p.train_clips, p.longest, p.size, p.size, seed=p.seed * 1000 + 1, workers=workers)
        self.eval = make_scenes(p.eval_clips, p.longest, p.size, p.size, seed=p.seed * 1000 + 2, workers=workers)
        self.latent = PixelLatent.fit(self.train.pixels[: min(64, p.train_clips)], p.factor)
        self.config = transformer_config(p, self.latent.channels, TINY_T5_SIZES["d_model"])
        self.adapter = WanAdapter(config_folder(workdir, self.config, p.factor), dtype=torch.float32, shift=p.shift)
        self.train_text, self.eval_text = self._embed_captions()
        self.train, self.eval = self.train.to(device), self.eval.to(device)
        self.log(f"data: {p.train_clips} training and {p.eval_clips} held-out scenes of {p.longest} frames "
                 f"{p.size}x{p.size} rendered and captioned in {time.perf_counter() - t:.1f} s ({workers} workers)")
        self._noise: dict[tuple[str, int], torch.Tensor] = {}
        #: length -> (run label, frames of the first continued clip): the sample grids
        self.samples: dict[int, list[tuple[str, torch.Tensor]]] = {
            length: [("ground truth", self.eval.pixels[0, :length].cpu())] for length in [plan.base_frames, *plan.lengths]
        }

    # -- data ------------------------------------------------------------------------------------------------
    def _embed_captions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions through the project's tiny UMT5 stack and ``WanAdapter.encode_prompts`` (random weights, fixed
        seed: a deterministic injective-enough code of the words that cross-attention learns to read)."""
        from transformers import UMT5EncoderModel

        from train.tiny.text_encoders import tiny_t5_encoder
        from train.tiny.t5_tokenizer import tiny_t5_tokenizer
        from train.models.wan import WanEncoders

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1234)
            tokenizer = tiny_t5_tokenizer(vocab_size=256, model_max_length=self.p.text_tokens, corpus=caption_corpus())
            encoder = tiny_t5_encoder(UMT5EncoderModel, tokenizer)
        encoders = WanEncoders(vae=None, text_encoder=encoder, tokenizer=tokenizer, max_sequence_length=self.p.text_tokens)
        out = []
        for scenes in (self.train, self.eval):
            chunks = [self.adapter.encode_prompts(encoders, scenes.captions[i : i + 256])["encoder_hidden_states"]
                      for i in range(0, len(scenes), 256)]
            out.append(torch.cat(chunks).float().to(self.device))
        return out[0], out[1]

    def geometry(self, frames: int):
        return self.adapter.geometry(frames, self.p.size, self.p.size)

    def batch(self, length: int, size: int, gen: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``size`` random windows of ``length`` frames from random training scenes (drawn from ``gen``)."""
        idx = torch.randint(len(self.train), (size,), generator=gen)
        off = torch.randint(self.p.longest - length + 1, (size,), generator=gen)
        frames = torch.stack([self.train.pixels[i, o : o + length] for i, o in zip(idx.tolist(), off.tolist())])
        return self.latent.encode(frames), {"encoder_hidden_states": self.train_text[idx.to(self.device)]}

    def fixed_noise(self, kind: str, length: int, clips: int) -> torch.Tensor:
        key = (kind, length)
        if key not in self._noise:
            gen = torch.Generator().manual_seed(_NOISE_KINDS[kind] + 7919 * length + 1_000_003 * self.p.seed)
            h = self.p.size // self.p.factor
            self._noise[key] = torch.randn(self.p.eval_clips, self.latent.channels, length, h, h, generator=gen)
        return self._noise[key][:clips].to(self.device)

    # -- models ----------------------------------------------------------------------------------------------
    def new_model(self, state: Optional[dict[str, torch.Tensor]], mode: str, attention: str):
        """A transformer (from ``state``, or freshly initialised), prepared like ``train/trainer.py`` prepares it
        (LoRA: frozen base in the adapter's dtype - bf16 on CUDA - and fp32 LoRA weights; full: fp32 weights),
        with the project's attention processors installed. Returns ``(model, trainable params, router)``."""
        from diffusers import WanTransformer3DModel
        from peft import LoraConfig

        from train.config_schema import AttentionConfig

        p = self.p
        torch.manual_seed(p.seed)
        model = WanTransformer3DModel(**self.config)
        if state is not None:
            model.load_state_dict(state)
        model.to(self.device)
        if mode == "lora":
            if self.cuda:
                model.to(torch.bfloat16)
            model.requires_grad_(False)
            model.add_adapter(LoraConfig(r=p.lora_rank, lora_alpha=p.lora_rank, init_lora_weights=True,
                                         target_modules=list(self.adapter.default_lora_targets)))
            for param in model.parameters():
                if param.requires_grad:
                    param.data = param.data.float()
        elif mode in ("full", "base"):
            model.requires_grad_(True)
        else:  # "eval": no training
            model.requires_grad_(False)
        cfg = AttentionConfig(
            type=attention, backend="auto", block_size=p.block_size, dense_layers=p.dense_layers,
            decay_factor=p.decay_factor, num_q_clusters=p.num_q_clusters, num_k_clusters=p.num_k_clusters,
            top_p=p.top_p,
        )
        router = self.adapter.install_attention(model, cfg, self.geometry(p.base_frames))
        params = [q for q in model.parameters() if q.requires_grad]
        return model, params, router

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.cuda else contextlib.nullcontext()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def predict(self, model, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict) -> torch.Tensor:
        with self.autocast():
            return self.adapter.predict(model, noisy, timesteps, cond)

    # -- training --------------------------------------------------------------------------------------------
    def train_run(self, model, params, router, *, length: int, steps: int, lr: float, batch: int,
                  curve_every: int = 0, label: str = "", report_every: int = 0) -> RunLog:
        """AdamW (no weight decay), linear warm-up then constant, grad-norm clip 1.0, MSE to the velocity; the
        batches, noise and noise levels depend only on (seed, length), so every run of a length sees the same."""
        p = self.p
        opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, p.warmup_steps)))
        gen = torch.Generator().manual_seed(p.seed * 7_777_777 + length)
        out = RunLog()
        if curve_every:
            out.curve.append((0.0, 0, self.curve_loss(model, length)))
        model.train()
        for step in range(steps):
            latents, cond = self.batch(length, batch, gen)
            noise = torch.randn(latents.shape, generator=gen).to(self.device)
            sigmas = self.adapter.sample_sigmas(batch, gen, torch.device("cpu")).to(self.device)
            with_prefix = torch.rand(batch, generator=gen) < p.cond_prob
            prefix = (torch.randint(1, length // 2 + 1, (batch,), generator=gen) * with_prefix).to(self.device)
            self.sync()
            t0 = time.perf_counter()
            noisy, timesteps, target = self.adapter.training_pair(latents, noise, sigmas)
            if p.cond_prob > 0:
                noisy, timesteps, keep = self.clean_prefix(latents, noisy, timesteps, prefix)
                pred = self.predict(model, noisy, timesteps, cond)
                loss = ((pred.float() - target.float()) ** 2 * keep).sum() / (keep.sum() * target[0, :, 0].numel())
            else:
                pred = self.predict(model, noisy, timesteps, cond)
                loss = F.mse_loss(pred.float(), target.float())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            value = float(loss.detach())  # synchronises
            self.sync()
            out.step_s.append(time.perf_counter() - t0)
            out.losses.append(value)
            out.densities.append(float(router.density()))
            if not math.isfinite(value):
                out.diverged = True
                self.log(f"  {label}: non-finite loss at step {step + 1}; run stopped")
                break
            if report_every and (step + 1) % report_every == 0:
                self.log(f"  {label} step {step + 1}/{steps}: train loss (last {report_every}) "
                         f"{statistics.mean(out.losses[-report_every:]):.4f}, {sum(out.step_s):.1f} s")
            if curve_every and ((step + 1) % curve_every == 0 or step + 1 == steps):
                out.curve.append((sum(out.step_s), step + 1, self.curve_loss(model, length)))
                model.train()
        model.eval()
        return out

    def clean_prefix(self, latents: torch.Tensor, noisy: torch.Tensor, timesteps: torch.Tensor,
                     prefix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Wan2.2-TI2V-style conditioning: the first ``prefix[b]`` frames of sample b are clean with timestep 0
        (per-token timesteps ``[B, N]``, which ``WanTransformer3DModel`` accepts); returns the new noisy latents,
        the per-token timesteps and the ``[B, 1, T, 1, 1]`` mask of the frames the loss counts."""
        frames = torch.arange(latents.shape[2], device=latents.device)
        clean = frames[None, :] < prefix[:, None]  # [B, T]
        noisy = torch.where(clean[:, None, :, None, None], latents.to(noisy.dtype), noisy)
        per_frame = torch.where(clean, torch.zeros_like(timesteps)[:, None], timesteps[:, None].expand_as(clean))
        per_token = per_frame.repeat_interleave(self.p.tokens_per_frame, dim=1)
        return noisy, per_token, (~clean)[:, None, :, None, None].float()

    # -- evaluation ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def eval_loss(self, model, length: int, clips: int, sigmas: tuple[float, ...]) -> dict[float, float]:
        """Flow-matching MSE on the first ``length`` frames of held-out scenes at fixed noise levels and noise."""
        model.eval()
        noise = self.fixed_noise("loss", length, clips)
        result = {}
        for s in sigmas:
            total = 0.0
            for i in range(0, clips, self.p.batch):
                j = min(i + self.p.batch, clips)
                latents = self.latent.encode(self.eval.pixels[i:j, :length])
                sig = torch.full((j - i,), float(s), device=self.device)
                noisy, timesteps, target = self.adapter.training_pair(latents, noise[i:j], sig)
                pred = self.predict(model, noisy, timesteps, {"encoder_hidden_states": self.eval_text[i:j]})
                total += float(F.mse_loss(pred.float(), target.float(), reduction="sum")) / target[0].numel()
            result[float(s)] = total / clips
        return result

    def curve_loss(self, model, length: int) -> float:
        values = self.eval_loss(model, length, self.p.curve_clips, self.p.eval_sigmas)
        return float(statistics.mean(values.values()))

    @torch.no_grad()
    def continuation(self, model, router, length: int, cond_frames: int, label: str = "") -> dict[str, Any]:
        """Generate frames ``cond_frames..length-1`` of held-out clips given the earlier ones, and score them
        against the scene's ground truth (replacement conditioning: the known frames are set to their noised
        ground truth at every step's noise level, with the same noise the sample started from)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        p, c = self.p, cond_frames
        model.eval()
        noise_all = self.fixed_noise("sample", length, p.sample_clips)
        frames = []
        for i in range(0, p.sample_clips, p.batch):
            j = i + p.batch
            x0 = self.latent.encode(self.eval.pixels[i:j, :length])
            noise = noise_all[i:j]
            cond = {"encoder_hidden_states": self.eval_text[i:j]}
            sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=p.shift)
            sched.set_timesteps(p.sample_steps, device=self.device)
            x = noise.clone()
            prefix = torch.full((x.shape[0],), c, device=self.device)
            for k, t in enumerate(sched.timesteps):
                s = float(sched.sigmas[k])
                timesteps = t.expand(x.shape[0]).float()
                if p.cond_prob > 0:  # the given frames clean, at timestep 0 (as trained)
                    x[:, :, :c] = x0[:, :, :c]
                    _, timesteps, _ = self.clean_prefix(x0, x, timesteps, prefix)
                else:  # replacement: the given frames noised to this step's level
                    x[:, :, :c] = (1.0 - s) * x0[:, :, :c] + s * noise[:, :, :c]
                with router.dense_override(k < p.sample_dense_steps):
                    v = self.predict(model, x, timesteps, cond)
                x = sched.step(v, t, x, return_dict=False)[0]
            x[:, :, :c] = x0[:, :, :c]
            frames.append(self.latent.decode(x))
        frames = torch.cat(frames)
        if label:
            self.samples.setdefault(length, []).append((label, frames[0].cpu()))
        return self.score(frames, length, c)

    def score(self, frames: torch.Tensor, length: int, c: int) -> dict[str, Any]:
        """Position error / PSNR / SSIM of generated frames ``c..length-1`` against the truth."""
        n = frames.shape[0]
        ev = self.eval
        truth = ev.pixels[:n, c:length]
        found_centres, found = metrics.detect_centres(frames[:, c:], ev.colours[:n, c:length], ev.backgrounds[:n])
        err = metrics.position_error(found_centres, ev.centres[:n, c:length])
        return {
            "pos_err": float(err.mean()),
            "pos_err_last": float(err[:, -1].mean()),
            "pos_err_per_frame": [float(v) for v in err.mean(0)],
            "found": float(found.float().mean()),
            "psnr": float(metrics.psnr(frames[:, c:], truth).mean()),
            "ssim": float(metrics.ssim(frames[:, c:], truth).mean()),
            "cond_frames": c,
            "generated_frames": length - c,
        }

    def static_baseline(self, length: int, c: int) -> dict[str, Any]:
        """The last known frame repeated: what a model that does not move the object would score."""
        n = self.p.sample_clips
        frames = self.eval.pixels[:n, :length].clone()
        frames[:, c:] = frames[:, c - 1 : c]
        return self.score(frames, length, c)

    def truth_check(self, length: int) -> float:
        """Position error of the detector on the ground-truth frames themselves (should be ~0)."""
        n = self.p.sample_clips
        centres, _ = metrics.detect_centres(self.eval.pixels[:n, :length], self.eval.colours[:n, :length],
                                            self.eval.backgrounds[:n])
        return float(metrics.position_error(centres, self.eval.centres[:n, :length]).mean())


# ---------------------------------------------------------------------------------------------------------------
# the experiment


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def attention_row(bench: Bench, length: int, density: float, batch: int) -> float:
    p = bench.p
    return metrics.attention_flops(batch, p.heads, length * p.tokens_per_frame, p.head_dim, p.layers, density)


def calibrate(bench: Bench, log) -> dict[str, float]:
    """Median step time of every kind of run on a throw-away model: picks the step counts for --minutes and
    compiles / autotunes the Triton kernels before anything is timed for the table."""
    p = bench.p
    times: dict[str, float] = {}
    model, params, router = bench.new_model(None, "base", "dense")
    times["base"] = bench.train_run(model, params, router, length=p.base_frames, steps=6, lr=0.0,
                                    batch=p.base_batch).step_time(skip=2)
    state = _state(model)
    del model, params
    for length in p.lengths:
        for attention in ATTENTIONS:
            for mode in MODES:
                key = f"{length}/{attention}/{mode}"
                try:
                    model, params, router = bench.new_model(state, mode, attention)
                    run = bench.train_run(model, params, router, length=length, steps=5, lr=0.0, batch=p.batch)
                    times[key] = run.step_time(skip=2)
                    del model, params
                except Exception as err:  # noqa: BLE001 - the run itself will fail again and be recorded
                    log(f"calibration of {key} failed ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
                        "assuming 3x the dense step")
                    times[key] = 3.0 * times.get(f"{length}/dense/{mode}", times["base"])
    log("calibration (median step s): " + ", ".join(f"{k} {v:.3f}" for k, v in times.items()))
    return times


def choose_steps(p: Plan, times: dict[str, float], elapsed: float, log) -> tuple[int, int]:
    """Base and fine-tune step counts that fit ``p.minutes`` (overheads: batch assembly and the loss curve ~ +30%
    on training steps; evaluation ~ 1/3 step per forward)."""
    budget = p.minutes * 60.0 - elapsed
    ft_keys = [k for k in times if k != "base"]
    fwd = {length: statistics.mean(times[k] for k in ft_keys if k.startswith(f"{length}/")) / 3.0 for length in p.lengths}
    loss_fwd = len(p.eval_sigmas) * p.eval_clips // p.batch
    sample_fwd = p.sample_steps * p.sample_clips // p.batch
    curve_fwd = (p.curve_points + 1) * len(p.eval_sigmas) * max(1, p.curve_clips // p.batch)
    models_per_length = len(ATTENTIONS) * (1 + len(MODES))
    evaluation = sum(fwd[l] * models_per_length * (loss_fwd + sample_fwd) + fwd[l] * len(ATTENTIONS) * len(MODES) * curve_fwd
                     for l in p.lengths)
    train_budget = (budget - evaluation - 20.0) / 1.3
    if train_budget <= 0:
        raise UserError(f"--minutes {p.minutes} leaves no time for training after setup ({elapsed:.0f} s) and "
                        f"evaluation (~{evaluation:.0f} s); give more minutes or fewer --eval-clips / --sample-clips")
    base_steps = max(50, int(p.base_share * train_budget / times["base"]))
    ft_steps = max(10, int((1.0 - p.base_share) * train_budget / sum(times[k] for k in ft_keys)))
    log(f"budget {p.minutes:g} min: {elapsed:.0f} s spent on setup and calibration, ~{evaluation:.0f} s of "
        f"evaluation -> base {base_steps} steps, every fine-tune {ft_steps} steps")
    return base_steps, ft_steps


def run(p: Plan, device: torch.device, log, save) -> dict[str, Any]:
    """The whole experiment; ``save(result)`` is called after every evaluated model (partial results survive a
    time-out), longest length first."""
    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    import diffusers
    import peft

    env.update(diffusers=diffusers.__version__, peft=peft.__version__)
    with tempfile.TemporaryDirectory(prefix="extq-") as tmp:
        bench = Bench(p, device, Path(tmp), log)
        times = None
        if p.minutes is not None:
            times = calibrate(bench, log)
            p.base_steps, p.ft_steps = choose_steps(p, times, time.perf_counter() - _T0, log)
        result: dict[str, Any] = {"plan": dataclasses.asdict(p), "env": env, "calibration": times, "runs": [],
                                  "baselines": {}, "detector_error_on_truth": {}, "skipped": [], "failed": [], "partial": True,
                                  "samples": bench.samples}
        # 1. the base model, dense, at F
        F0 = p.base_frames
        model, params, router = bench.new_model(None, "base", "dense")
        base_log = bench.train_run(model, params, router, length=F0, steps=p.base_steps, lr=p.base_lr,
                                   batch=p.base_batch, label="base", report_every=max(1, p.base_steps // 5))
        state = _state(model)
        base_row = {
            "name": "base", "length": F0, "attention": "dense", "mode": "base", "steps": len(base_log.losses),
            "train_s": sum(base_log.step_s), "step_ms": 1e3 * base_log.step_time(), "density": 1.0,
            "attn_tflop_step": attention_row(bench, F0, 1.0, p.base_batch) / 1e12,
            "train_loss_first": statistics.mean(base_log.losses[:10]),
            "train_loss_last": statistics.mean(base_log.losses[-10:]),
            "diverged": base_log.diverged,
            "loss": _mean(bench.eval_loss(model, F0, p.eval_clips, p.eval_sigmas)),
            **bench.continuation(model, router, F0, F0 // 2, label="base"),
        }
        result["base"] = base_row
        result["baselines"][str(F0)] = bench.static_baseline(F0, F0 // 2)
        log(f"base: {base_row['steps']} steps in {base_row['train_s']:.1f} s, train loss "
            f"{base_row['train_loss_first']:.3f} -> {base_row['train_loss_last']:.3f}; held-out loss at F={F0} "
            f"{base_row['loss']:.4f}, continuation pos. err {base_row['pos_err']:.3f} (static "
            f"{result['baselines'][str(F0)]['pos_err']:.3f}), PSNR {base_row['psnr']:.2f}")
        del model, params
        save(result)
        # 2. every length, longest first: no fine-tune, then the fine-tunes
        curve_every = max(1, p.ft_steps // p.curve_points)
        deadline = None if p.minutes is None else p.minutes * 60.0  # start no run past the budget
        for length in sorted(p.lengths, reverse=True):
            result["baselines"][str(length)] = bench.static_baseline(length, F0)
            result["detector_error_on_truth"][str(length)] = bench.truth_check(length)
            for attention in ATTENTIONS:
                _attempt(result, log, f"{length}f no-FT {attention}", lambda: no_finetune_row(bench, state, length, attention))
            for mode in MODES:
                for attention in ATTENTIONS:
                    label = f"{length}f {attention} {mode}"
                    if deadline is not None and time.perf_counter() - _T0 > deadline:
                        log(f"  {label}: skipped, past the --minutes budget")
                        result["skipped"].append(label)
                        continue
                    _attempt(result, log, label, lambda: finetune_row(bench, state, length, attention, mode, curve_every))
                    save(result)
        result["total_s"] = time.perf_counter() - _T0
        result["partial"] = False
        return result


def no_finetune_row(bench: Bench, state: dict, length: int, attention: str) -> dict[str, Any]:
    p = bench.p
    model, _, router = bench.new_model(state, "eval", attention)
    losses = bench.eval_loss(model, length, p.eval_clips, p.eval_sigmas)
    row = {"name": f"no-FT {attention}", "length": length, "attention": attention, "mode": "none", "steps": 0,
           "train_s": 0.0, "step_ms": float("nan"), "loss": _mean(losses), "loss_per_sigma": losses,
           **bench.continuation(model, router, length, p.base_frames, f"no-FT {attention}")}
    row["density"] = float(router.density())
    row["attn_tflop_step"] = float("nan")
    return row


def finetune_row(bench: Bench, state: dict, length: int, attention: str, mode: str, curve_every: int) -> dict[str, Any]:
    p = bench.p
    model, params, router = bench.new_model(state, mode, attention)
    lr = p.lr_lora if mode == "lora" else p.lr_full
    rl = bench.train_run(model, params, router, length=length, steps=p.ft_steps, lr=lr, batch=p.batch,
                         curve_every=curve_every, label=f"{length}f {attention} {mode}")
    density = statistics.mean(rl.densities) if rl.densities else 1.0
    losses = bench.eval_loss(model, length, p.eval_clips, p.eval_sigmas)
    return {
        "name": f"FT {attention} {mode}", "length": length, "attention": attention, "mode": mode,
        "steps": len(rl.losses), "train_s": sum(rl.step_s), "step_ms": 1e3 * rl.step_time(), "density": density,
        "attn_tflop_step": attention_row(bench, length, density, p.batch) / 1e12, "loss": _mean(losses),
        "loss_per_sigma": losses, "diverged": rl.diverged, "train_loss_first": statistics.mean(rl.losses[:5]),
        "train_loss_last": statistics.mean(rl.losses[-5:]), "curve": rl.curve,
        "trainable_params": sum(q.numel() for q in params),
        **bench.continuation(model, router, length, p.base_frames, label=f"{attention} {mode}"),
    }


def _attempt(result: dict[str, Any], log, label: str, make_row) -> None:
    """One evaluated model; a failure (say an out-of-memory or a kernel error) is recorded and the benchmark goes on
    with the other runs rather than losing them all."""
    try:
        row = make_row()
    except Exception as err:  # noqa: BLE001 - recorded in results.json / results.md and printed
        if isinstance(err, torch.cuda.OutOfMemoryError):
            torch.cuda.empty_cache()
        message = f"{type(err).__name__}: {err}".splitlines()[0][:300]
        log(f"  {label}: FAILED - {message}")
        result["failed"].append({"run": label, "error": message})
        return
    result["runs"].append(row)
    log(_row_line(row))


def _mean(values: dict[float, float]) -> float:
    return float(statistics.mean(values.values()))


def _row_line(r: dict) -> str:
    return (f"  {r['length']:>3}f {r['name']:<18} loss {r['loss']:.4f}  pos.err {r['pos_err']:.3f} "
            f"(last {r['pos_err_last']:.3f}, found {r['found']:.2f})  PSNR {r['psnr']:.2f}  SSIM {r['ssim']:.3f}  "
            f"density {r['density']:.3f}  step {report.fmt(r['step_ms'], 1)} ms  train {r['train_s']:.1f} s")


# ---------------------------------------------------------------------------------------------------------------
# output


def render_markdown(result: dict[str, Any], command: str) -> str:
    p, env = result["plan"], result["env"]
    b = result["base"]
    lines = [
        "# Length-extension quality (issue 15)", "",
        f"{env['device']}; torch {env['torch']}, diffusers {env['diffusers']}, peft {env['peft']}; {env['date']}; "
        + (f"{result['total_s']:.0f} s end to end." if not result.get("partial") else
           "**partial results** (the run was still going or was stopped).")
        + (f" Skipped past the budget: {', '.join(result['skipped'])}." if result.get("skipped") else "")
        + "".join(f" **{f['run']} failed**: {f['error']}." for f in result.get("failed", [])), "",
        f"`{command}`", "",
        f"Model: `WanTransformer3DModel`, {p['layers']} layers, {p['heads']} heads x {p['head_dim']}, ffn "
        f"{p['ffn_dim']}, pixel latent {p['size']}x{p['size']} folded {p['factor']}x{p['factor']} "
        f"({p['size'] // p['factor'] // 2}x{p['size'] // p['factor'] // 2} = {p['size'] ** 2 // (4 * p['factor'] ** 2)} "
        f"tokens per frame). Base: dense, F = {p['base_frames']} frames, {b['steps']} steps of batch "
        f"{p['base_batch']} at lr {p['base_lr']:g} ({b['train_s']:.0f} s); train loss {b['train_loss_first']:.3f} -> "
        f"{b['train_loss_last']:.3f}, held-out loss at F {b['loss']:.4f}, continuation of F/2 frames: position error "
        f"{b['pos_err']:.3f} (static {result['baselines'][str(p['base_frames'])]['pos_err']:.3f}), PSNR {b['psnr']:.2f}.",
        "",
        f"Fine-tunes: {p['ft_steps']} steps of batch {p['batch']}, LoRA r{p['lora_rank']} at lr {p['lr_lora']:g}, "
        f"full at lr {p['lr_full']:g}; radial block {p['block_size']} decay {p['decay_factor']:g}; SVG2 "
        f"{p['num_q_clusters']}/{p['num_k_clusters']} clusters, top-p {p['top_p']:g}; dense layers {p['dense_layers']}. "
        f"Held-out loss: mean over {p['eval_clips']} clips x sigma {list(p['eval_sigmas'])}. Continuation: "
        f"{p['sample_clips']} clips, first {p['base_frames']} frames given, {p['sample_steps']} Euler steps; "
        "position error in frame widths (mean over generated frames; `last` = final frame), PSNR dB / SSIM over "
        "generated frames. Attention TFLOP per training step: 4·B·H·N²·D·density·layers × 3.5.",
    ]
    for length in sorted((p["base_frames"] * m for m in p["multipliers"]), reverse=True):
        rows = [r for r in result["runs"] if r["length"] == length]
        if not rows:
            continue
        dense_ft = {r["mode"]: r for r in rows if r["attention"] == "dense" and r["mode"] in MODES}
        dense_noft = next((r for r in rows if r["mode"] == "none" and r["attention"] == "dense"), None)
        table = []
        for r in rows:
            ref = dense_ft.get(r["mode"], dense_noft)
            vs = "-" if ref is None or ref is r else f"{100 * (r['loss'] / ref['loss'] - 1):+.1f}%"
            xstep = "-" if ref is None or r["mode"] == "none" else f"{ref['step_ms'] / r['step_ms']:.2f}"
            flops = "-" if r["mode"] == "none" else f"{100 * r['density']:.0f}%"
            table.append([
                r["name"], f"{r['density']:.3f}", report.fmt(r["step_ms"], 1), xstep,
                report.fmt(r["attn_tflop_step"], 3), flops, f"{r['train_s']:.1f}", f"{r['loss']:.4f}", vs,
                f"{r['pos_err']:.3f}", f"{r['pos_err_last']:.3f}", f"{r['found']:.2f}", f"{r['psnr']:.2f}",
                f"{r['ssim']:.3f}",
            ])
        s = result["baselines"][str(length)]
        table.append(["static (last given frame repeated)", "-", "-", "-", "-", "-", "-", "-", "-",
                      f"{s['pos_err']:.3f}", f"{s['pos_err_last']:.3f}", f"{s['found']:.2f}", f"{s['psnr']:.2f}",
                      f"{s['ssim']:.3f}"])
        tokens = length * p["size"] ** 2 // (4 * p["factor"] ** 2)
        lines += ["", f"## {length // p['base_frames']}F = {length} frames ({tokens} tokens; {p['base_frames']} given, "
                  f"{length - p['base_frames']} generated)", "",
                  report.markdown_table(
                      ["run", "density", "step ms", "x dense step", "attn TFLOP/step", "attn FLOPs vs dense",
                       "train s", "held-out loss", "vs dense (same mode)", "pos. err", "last", "found", "PSNR",
                       "SSIM"], table)]
    lines += ["", f"Detector check (ground-truth frames, should be ~0): "
              + ", ".join(f"{k} frames {v:.4f}" for k, v in result.get("detector_error_on_truth", {}).items())]
    return "\n".join(lines) + "\n"


def write_plot(result: dict[str, Any], path: Path) -> Optional[str]:
    p = result["plan"]
    panels = []
    for length in [p["base_frames"] * m for m in p["multipliers"]]:
        panel = report.Panel(f"{length} frames ({length // p['base_frames']}F)", "training wall-clock (s)",
                             "held-out flow-matching loss")
        for r in result["runs"]:
            if r["length"] != length:
                continue
            if r["mode"] == "none":
                if r["attention"] == "dense":
                    panel.hlines.append(("no fine-tune (dense)", r["loss"]))
                continue
            xs, _, ys = zip(*r["curve"]) if r["curve"] else ((), (), ())
            panel.series.append(report.Series(r["name"].removeprefix("FT "), list(xs), list(ys),
                                              report.COLOURS[r["attention"]], dashed=r["mode"] == "lora"))
        panels.append(panel)
    return report.plot_panels(path, panels, f"Extension from {p['base_frames']} frames: loss vs training time "
                                            f"({result['env']['device']})")


def write_outputs(out: Path, result: dict[str, Any], command: str, *, final: bool = True) -> list[str]:
    """results.json and results.md (and, when ``final``, the plot and the sample grids), each written to a
    temporary name then renamed: a run stopped at any point leaves complete files of what was done."""
    out.mkdir(parents=True, exist_ok=True)
    written = []

    def put(name: str, text: str) -> None:
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)
        written.append(name)

    samples = result.get("samples", {})
    put("results.json", json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=1, default=float) + "\n")
    put("results.md", render_markdown(result, command))
    if not final:
        return written
    try:  # figures last: a plotting problem must not cost the numbers
        tmp = out / ".loss_vs_wallclock.png.tmp.png"
        backend = write_plot(result, tmp)
        if backend is None:
            print("plot skipped: neither matplotlib nor Pillow is installed", flush=True)
        else:
            os.replace(tmp, out / "loss_vs_wallclock.png")
            written.append(f"loss_vs_wallclock.png ({backend})")
        for length, rows in samples.items():
            name = f"samples_{length}f.png"
            tmp = out / f".{name}.tmp.png"
            if report.save_grid(tmp, [(label, frames.numpy()) for label, frames in rows]):
                os.replace(tmp, out / name)
                written.append(name)
    except Exception as err:  # noqa: BLE001 - reported; results.json / results.md are already written
        print(f"figures failed: {type(err).__name__}: {err}", flush=True)
        for leftover in out.glob(".*.tmp.png"):
            leftover.unlink()
    return written


# ---------------------------------------------------------------------------------------------------------------
# command line


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--out", required=True, help="output folder (must be empty or absent unless --force)")
    ap.add_argument("--force", action="store_true", help="write into a non-empty --out (replacing our files)")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke-test sizes (seconds; numbers are meaningless)")
    ap.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    ap.add_argument("--minutes", type=float, help="time budget of the whole command; picks the step counts")
    ap.add_argument("--base-steps", type=int, help="base training steps (fixes the count; no calibration)")
    ap.add_argument("--ft-steps", type=int, help="steps of every fine-tune (fixes the count; no calibration)")
    for name, typ in (("size", int), ("factor", int), ("base-frames", int), ("layers", int), ("heads", int),
                      ("head-dim", int), ("ffn-dim", int), ("batch", int), ("base-batch", int), ("train-clips", int),
                      ("eval-clips", int), ("sample-clips", int), ("sample-steps", int), ("block-size", int),
                      ("lora-rank", int), ("seed", int), ("lr-full", float), ("lr-lora", float), ("base-lr", float),
                      ("dense-layers", int), ("decay-factor", float), ("num-q-clusters", int),
                      ("num-k-clusters", int), ("top-p", float), ("shift", float), ("sample-dense-steps", int),
                      ("cond-prob", float)):
        ap.add_argument(f"--{name}", type=typ, dest=name.replace("-", "_"))
    ap.add_argument("--multipliers", type=int, nargs="+", help="extended lengths as multiples of F (default 2 4)")
    ap.add_argument("--threads", type=int, help="CPU threads of torch (default: 1 with --tiny, else torch's)")
    return ap.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    plan = build_plan(args)
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not args.force)):
        raise UserError(f"--out {str(out)!r} exists and is not an empty folder; pass --force to write into it")
    if args.device is not None:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA GPU is available")
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.tiny and args.device is None:
        raise UserError("the default configuration needs a CUDA GPU (it takes ~14 GPU minutes); use --tiny on a CPU, "
                        "or --device cpu with smaller --size / --base-frames / steps")
    if args.threads is not None or args.tiny:  # tiny tensors: one thread avoids oversubscription stalls (10x)
        torch.set_num_threads(max(1, args.threads or 1))
    if device.type == "cuda":
        if device.index is None:  # set_device needs an index
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    command = "python benchmarks/extension_quality.py " + " ".join(sys.argv[1:] if argv is None else argv)

    def log(text: str) -> None:
        print(f"[{time.perf_counter() - _T0:6.1f}s] {text}", flush=True)

    log(f"plan: F={plan.base_frames}, lengths {plan.lengths}, {plan.tokens_per_frame} tokens/frame "
        f"({plan.longest * plan.tokens_per_frame} at {plan.longest} frames), device {device}")
    result = run(plan, device, log, lambda partial: write_outputs(out, partial, command, final=False))
    written = write_outputs(out, result, command)
    print(render_markdown(result, command), flush=True)
    log(f"wrote {', '.join(written)} to {out}")


if __name__ == "__main__":
    from train.cli import run_main

    sys.exit(run_main(main))
