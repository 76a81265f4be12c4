"""One optimizer step: data -> noise level -> forward through sparse attention -> flow-matching loss -> update.

Noise and noise levels come from generators seeded by (seed, step, micro-batch, rank), and the data order is a
deterministic function of (seed, epoch) from which consumed batches are skipped, so a resumed run continues with the
same losses as an uninterrupted one. A non-finite loss on any rank skips the step on every rank; the hooks'
``on_optimizer_step`` (train/hooks/) runs inside the step's timing.
"""

from __future__ import annotations

import time
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from train.errors import UserError
from train.geometry import VideoGeometry
from train.run import Run


def one_step(run: Run) -> tuple[float, dict]:
    """One optimizer step = gradient_accumulation_steps micro-batches. A non-finite loss on any rank skips
    the step on every rank (a zero loss that still touches every trainable parameter keeps ranks in step)."""
    cfg, acc = run.cfg, run.accelerator
    t0 = time.perf_counter()
    losses, tokens, samples, densities, bad = [], 0, 0, [], False
    for micro in range(cfg.train.gradient_accumulation_steps):
        batch = next(run.loader)
        if batch.get("failed"):
            run.data_report.record_failures(batch["failed"])
        with acc.accumulate(run.transformer):
            if batch_size(batch) == 0:  # every clip failed to decode (counted above): still run a forward, so
                if run.last_good is None:  # that DDP/ZeRO ranks stay in step, on the last good batch, as NaN
                    raise UserError("the first batch failed to decode entirely; check the videos (data.on_bad_video)")
                loss, geometry = micro_step(run, run.last_good, micro)
                loss = loss * float("nan")
            else:
                run.last_good = batch
                loss, geometry = micro_step(run, batch, micro)
            finite = all_finite(acc, loss)
            if not finite:
                bad = True
                loss = sum(p.sum() for p in run.params) * 0.0
            acc.backward(loss * (run.sp.size if run.sp is not None else 1))
            grad_norm = None
            if acc.sync_gradients:
                grad_norm = acc.clip_grad_norm_(run.params, cfg.train.max_grad_norm)
            if not (bad and acc.sync_gradients and acc.distributed_type.value != "DEEPSPEED"):
                run.optimizer.step()
            elif acc.scaler is not None:  # fp16: the skipped step must still reset the scaler
                acc.scaler.update()
            run.scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
        if finite:
            losses.append(float(loss.detach()))
        samples += batch_size(batch)
        tokens += batch_size(batch) * geometry.video_tokens
        if run.router is not None:
            densities.append(float(run.router.density()))
    run.pos.step += 1
    run.hooks.on_optimizer_step(run, skipped=bad)
    dt = time.perf_counter() - t0
    world = run.dp_size  # ranks of one sequence-parallel group work on the same samples
    stats = {
        "lr": run.scheduler.get_last_lr()[0],
        "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
        "step_time_s": dt,
        "samples_per_s": samples * world / dt,
        "tokens_per_s": tokens * world / dt,
        "attention_density": sum(densities) / len(densities) if densities else 1.0,
        "bad_steps": run.pos.bad_total,
        **run.data_report.as_dict(),
    }
    if torch.cuda.is_available():
        stats["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return (sum(losses) / len(losses) if losses else float("nan")), stats


def micro_step(run: Run, batch: dict, micro: int) -> tuple[torch.Tensor, VideoGeometry]:
    adapter, device = run.adapter, run.device
    gen = torch.Generator().manual_seed(noise_seed(run, micro))
    latents, cond = conditioning(run, batch)
    geometry = run.geometry(*clip_shape(batch))
    noise = torch.randn(latents.shape, generator=gen, dtype=torch.float32).to(device, latents.dtype)
    sigmas = adapter.sample_sigmas(latents.shape[0], gen, torch.device("cpu")).to(device)
    noisy, timesteps, target = adapter.training_pair(latents, noise, sigmas)
    if run.router is not None:
        run.router.begin_step()
    pred = adapter.predict(run.transformer, noisy.to(run.weight_dtype), timesteps, cond)
    loss = F.mse_loss(pred.float(), target.float())
    return loss, geometry


def noise_seed(run: Run, micro: int) -> int:
    return (run.cfg.train.seed * 1_000_003 + run.pos.step * 1009 + micro * 101 + run.dp_rank) % (2**63)


@torch.no_grad()
def conditioning(run: Run, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    device = run.device
    if "latents" in batch:  # precomputed cache
        latents = batch["latents"].to(device, torch.float32)
        cond = {k: v.to(device) for k, v in batch["cond"].items()}
        return latents, cond
    pixels = batch["pixels"].to(device, torch.float32)
    latents = run.adapter.encode_videos(run.encoders, pixels).float()
    cond = run.adapter.encode_prompts(run.encoders, list(batch["captions"]))
    return latents, {k: v.to(device) if torch.is_tensor(v) else v for k, v in cond.items()}


def all_finite(accelerator: Any, loss: torch.Tensor) -> bool:
    flag = torch.isfinite(loss.detach()).float().reshape(1)
    return bool(accelerator.gather(flag).min() > 0)


def batches(run: Run) -> Iterator[dict]:
    """Endless iterator over batches that records its position (epoch, batch) for resume."""
    from data.dataset import make_dataloader

    while True:
        loader = make_dataloader(
            run.dataset,
            run.cfg.data,
            batch_size=run.cfg.train.batch_size,
            seed=run.cfg.train.seed,
            epoch=run.pos.epoch,
            rank=run.dp_rank,
            world_size=run.dp_size,
            skip_batches=run.pos.batches_in_epoch,
        )
        for batch in loader:
            run.pos.batches_in_epoch += 1
            yield batch
        run.pos.epoch += 1
        run.pos.batches_in_epoch = 0


def batch_size(batch: dict) -> int:
    return int(batch["batch_size"])


def clip_shape(batch: dict) -> tuple[int, int, int]:
    """Pixel (frames, height, width) of the clips of a batch (the collate functions put it beside the tensors)."""
    return tuple(int(x) for x in batch["clip_shape"])  # type: ignore[return-value]
