"""The fine-tuning loop: data -> noise level -> forward through sparse attention -> flow-matching loss -> step.

Everything distributed goes through accelerate (DDP or DeepSpeed ZeRO-2/3, chosen by the accelerate config
the run is launched with); everything model-specific goes through the family adapter (train/models/).
A resumed run continues with the same losses as an uninterrupted one: noise and noise levels are drawn from
generators seeded by (seed, step, micro-batch, rank), and the data order is a deterministic function of
(seed, epoch) from which the consumed batches are skipped.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F

from train import checkpointing, tracking
from train.config import config_to_dict, dump_config, save_config, write_text_atomic
from train.config_schema import RecipeConfig
from train.errors import OOM_ADVICE, UserError
from train.models import get_adapter
from train.geometry import VideoGeometry
from train.models.base import ModelAdapter


@dataclass
class TrainResult:
    run_dir: Path
    final_dir: Path
    losses: list[float] = field(default_factory=list)  # one per optimizer step, mean over micro-batches
    bad_steps: int = 0
    exported_to: Optional[Path] = None


@dataclass
class _Position:
    """Where the loop is; saved in training_state.json so that a resume continues exactly."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    bad_in_a_row: int = 0
    bad_total: int = 0
    newest_checkpoint: Optional[str] = None  # folder name of the last checkpoint written
    protected_checkpoint: Optional[str] = None  # the last one written before the latest run of bad steps


def train(cfg: RecipeConfig) -> TrainResult:
    return Trainer(cfg).run()


class Trainer:
    def __init__(self, cfg: RecipeConfig) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.train.output_dir)
        self.accelerator = self._make_accelerator()
        self.device = self.accelerator.device
        self.pos = _Position()
        self.geometries: dict[tuple[int, int, int], VideoGeometry] = {}
        self.router: Any = None
        self.sp: Any = None  # SequenceParallel when parallel.sequence_parallel_size > 1
        self._validator: Any = None
        self._last_good: Optional[dict] = None  # last batch that decoded (stand-in for an all-failed batch)
        self.data_report: Any = None  # data.dataset.SkipReport: skipped videos by reason, decode failures
        self._checkpoint_due = False  # a checkpoint step fell on a bad step: write it after the next good one

    # ------------------------------------------------------------------------------------------------------------
    # setup

    def _make_accelerator(self) -> Any:
        from accelerate import Accelerator
        from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

        cfg = self.cfg
        precision = cfg.train.mixed_precision
        if not torch.cuda.is_available() and precision != "no":
            precision = "no"  # CPU autocast in bf16 is slow and the Triton interpreter mishandles bf16
        launched_distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1  # set by accelerate launch / torchrun
        handlers = [InitProcessGroupKwargs(backend="gloo")] if launched_distributed and not torch.cuda.is_available() else []
        return Accelerator(
            mixed_precision=precision,
            gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
            log_with=tracking.tracker_name(cfg.tracking),
            project_config=ProjectConfiguration(project_dir=str(self.run_dir)),
            kwargs_handlers=handlers,
        )

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def _print(self, text: str) -> None:
        if self.is_main:
            print(text, flush=True)

    def _weight_dtype(self) -> torch.dtype:
        precision = self.accelerator.mixed_precision
        if self.cfg.train.mode == "full" or precision == "no":
            return torch.float32
        return torch.bfloat16 if precision == "bf16" else torch.float16

    def _create_inputs(self) -> None:
        """Generated inputs (tiny model, synthetic data) the recipe asks for, only into folders marked as generated."""
        from train.bootstrap import check_generated_inputs, create_missing_inputs
        from train.preflight import check_paths

        check_paths(self.cfg)
        check_generated_inputs(self.cfg)  # on every rank: the same error everywhere, before anything is written
        if self.is_main:
            for line in create_missing_inputs(self.cfg):
                self._print(f"created {line}")
        self.accelerator.wait_for_everyone()

    def _check_recipe(self, adapter: ModelAdapter) -> Any:
        """Everything about the recipe that can be checked before the run folder is touched: clip shapes for the
        VAE (data, buckets, validation), export formats, a reused output folder, resume compatibility."""
        from train.preflight import check_recipe
        from train.resume import plan_resume

        check_recipe(self.cfg, adapter)
        t = self.cfg.train
        earlier = bool(checkpointing.list_checkpoints(self.run_dir)) or (self.run_dir / "final").is_dir()
        if earlier and t.resume_from is None and not t.overwrite_output_dir:  # checked on every rank alike
            raise UserError(
                f"train.output_dir {self.run_dir} holds checkpoints or final weights of an earlier run; "
                "continue it with train.resume_from=latest, replace it with train.overwrite_output_dir=true, "
                "or choose another train.output_dir"
            )
        return plan_resume(self.cfg)

    def _prepare_run_dir(self, plan: Any) -> None:
        """The first write into the run folder, once the whole recipe is known to be usable."""
        from train.resume import log_changes

        t = self.cfg.train
        if self.is_main:
            for note in plan.notes:
                self._print(note)
            if plan.checkpoint is None:  # a fresh run
                if t.overwrite_output_dir:
                    removed = checkpointing.remove_run_outputs(self.run_dir)
                    if removed:
                        self._print(f"train.overwrite_output_dir: removed the earlier run's {', '.join(removed)} in {self.run_dir}")
                else:  # a fresh run in a reused folder starts a fresh local log
                    for name in ("metrics.jsonl", "config-changes.jsonl"):
                        (self.run_dir / name).unlink(missing_ok=True)
            else:
                if t.overwrite_output_dir:
                    self._print("train.overwrite_output_dir is ignored: the run resumes (train.resume_from)")
                _drop_metrics_after(self.run_dir / "metrics.jsonl", plan.step)  # rows the interrupted run logged later
                for key, (old, new) in plan.changes.items():
                    self._print(f"resume: {key} {old} -> {new} from step {plan.step + 1}")
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if plan.checkpoint is not None:
                log_changes(self.run_dir, plan.step, plan.changes)
            self._print("resolved config:\n" + dump_config(self.cfg))
            save_config(self.cfg, self.run_dir / "config.yaml")
        self.accelerator.wait_for_everyone()

    def _build_data(self, adapter: ModelAdapter) -> tuple[Any, Any]:
        """Clips decoded on the fly, or the precomputed latent cache when ``data.cache_dir`` is set
        (encoded here first when the folder holds no cache yet)."""
        cfg = self.cfg
        if cfg.data.cache_dir:
            from data.cache import open_cache

            if not (Path(cfg.data.cache_dir) / "manifest.json").is_file():
                from train.precompute import precompute

                self._print(f"data.cache_dir {cfg.data.cache_dir} holds no cache yet: encoding the dataset once")
                with self._no_zero3_init():  # every rank encodes its own shards with whole encoders
                    precompute(cfg, state=self.accelerator.state)
                self.accelerator.wait_for_everyone()
            dataset, report = open_cache(
                cfg.data, model_id=cfg.model.pretrained, revision=cfg.model.revision, family=cfg.model.family
            )
        else:
            from data.dataset import build_dataset

            dataset, report = build_dataset(cfg.data, adapter.frame_multiple, cfg.train.seed)
        self.data_report = report
        self._print(f"{len(dataset)} clips; {report}")
        if len(dataset) == 0:
            raise UserError(f"the dataset is empty after filtering ({report}); check data.path, data.frames, data.fps")
        return dataset, report

    def _build_model(self, adapter: ModelAdapter) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
        cfg = self.cfg
        transformer = adapter.load_transformer()  # in the adapter's dtype (keeps the family's fp32 modules)
        if cfg.train.mode == "lora":
            from peft import LoraConfig

            transformer.requires_grad_(False)
            transformer.add_adapter(
                LoraConfig(
                    r=cfg.lora.rank,
                    lora_alpha=cfg.lora.alpha,
                    lora_dropout=cfg.lora.dropout,
                    target_modules=list(cfg.lora.target_modules),
                    init_lora_weights=True,
                )
            )
            for p in transformer.parameters():  # LoRA weights train in fp32 under autocast
                if p.requires_grad:
                    p.data = p.data.float()
        else:
            transformer.requires_grad_(True)
        from train import step_speed  # gradient checkpointing (and its policy), regional compilation

        self.step_speed = step_speed.configure_for_trainer(transformer, cfg.train, adapter, self.accelerator, self._print,
                                                           sequence_parallel_size=cfg.parallel.sequence_parallel_size)
        params = [p for p in transformer.parameters() if p.requires_grad]
        if not params:
            raise UserError(f"no trainable parameters: lora.target_modules {cfg.lora.target_modules} matched no module")
        return transformer, params

    def _build_optimizer(self, params: list[torch.nn.Parameter]) -> tuple[Any, Any]:
        from diffusers.optimization import get_scheduler

        t = self.cfg.train
        optimizer = torch.optim.AdamW(
            params, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon, weight_decay=t.weight_decay
        )
        name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[t.lr_scheduler]
        scheduler = get_scheduler(
            name,
            optimizer=optimizer,
            num_warmup_steps=t.lr_warmup_steps * self.accelerator.num_processes,
            num_training_steps=t.max_steps * self.accelerator.num_processes,
        )
        return optimizer, scheduler

    def _geometry(self, adapter: ModelAdapter, frames: int, height: int, width: int) -> VideoGeometry:
        key = (frames, height, width)
        if key not in self.geometries:
            self.geometries[key] = adapter.geometry(frames, height, width)
        return self.geometries[key]

    def _install_attention(self, adapter: ModelAdapter, model: torch.nn.Module, geometry: VideoGeometry) -> None:
        """Sparse attention processors (once: the router follows the clip shape of every forward by itself),
        and the sequence-parallel hooks when asked for."""
        unwrapped = self.accelerator.unwrap_model(model)
        self.router = adapter.install_attention(unwrapped, self.cfg.attention, geometry)
        if self.sp is not None:
            adapter.install_sequence_parallel(unwrapped, self.sp)
            self.router.sequence_parallel = self.sp

    @contextmanager
    def _no_zero3_init(self) -> Iterator[None]:
        """Under ZeRO-3, transformers partitions every model it loads; frozen encoders must stay whole.

        (accelerate's ``zero3_init_context_manager(enable=False)`` leaves transformers' ZeRO-3 switch on in
        accelerate 1.15, so the switch is cleared and restored here through transformers' own setters.)
        """
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        if plugin is None or getattr(plugin, "dschf", None) is None:
            yield
            return
        from transformers.integrations import set_hf_deepspeed_config, unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        try:
            yield
        finally:
            set_hf_deepspeed_config(plugin.dschf)

    @property
    def dp_rank(self) -> int:
        return self.sp.dp_rank if self.sp is not None else self.accelerator.process_index

    @property
    def dp_size(self) -> int:
        return self.sp.dp_size if self.sp is not None else self.accelerator.num_processes

    # ------------------------------------------------------------------------------------------------------------
    # the loop

    def run(self) -> TrainResult:
        cfg = self.cfg
        from accelerate.utils import set_seed

        self._create_inputs()
        set_seed(cfg.train.seed)
        if cfg.parallel.sequence_parallel_size > 1:
            from train.sequence_parallel import SequenceParallel

            self.sp = SequenceParallel.create(cfg.parallel.sequence_parallel_size)
        adapter = get_adapter(cfg.model.family)(
            cfg.model.pretrained,
            cfg.model.revision,
            self._weight_dtype(),
            shift=cfg.train.timestep_shift,
            timestep_sampling=cfg.train.timestep_sampling,
        )
        base_geometry = self._geometry(adapter, cfg.data.frames, cfg.data.height, cfg.data.width)
        plan = self._check_recipe(adapter)  # nothing in the run folder is written before this passed
        from train.memory_fit import check_before_loading

        check_before_loading(cfg, adapter, self.accelerator)  # one line, before any weight is loaded
        dataset, _ = self._build_data(adapter)
        self._prepare_run_dir(plan)
        transformer, params = self._build_model(adapter)
        optimizer, scheduler = self._build_optimizer(params)
        loader = self._make_loader(dataset)
        ema = self._make_ema(params)

        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        if plugin is not None:  # what accelerate cannot fill: micro-batch, clipping, ZeRO-3 buckets (diffusers width)
            from train.deepspeed_config import fill_auto_values

            fill_auto_values(plugin.deepspeed_config, transformer, micro_batch=cfg.train.batch_size,
                             max_grad_norm=cfg.train.max_grad_norm)
        transformer, optimizer, scheduler = self.accelerator.prepare(transformer, optimizer, scheduler)
        if ema is not None:
            ema.to(self.device)
            self.accelerator.register_for_checkpointing(ema)
        self._install_attention(adapter, transformer, base_geometry)
        if cfg.attention.type == "svg2":  # its warm-start centroids are part of an exact resume
            self.accelerator.register_for_checkpointing(self.router)
        encoders = None
        if not cfg.data.cache_dir:  # with a latent cache the VAE and text encoders are not needed to train
            with self._no_zero3_init():  # frozen encoders stay whole on every rank
                encoders = adapter.load_encoders(self.device)
        self.encoders = encoders

        resume = plan.checkpoint
        if resume is not None:
            try:
                self.accelerator.load_state(str(resume / "accelerate"))
            except (RuntimeError, OSError, ValueError, EOFError) as err:
                raise UserError(f"train.resume_from: cannot load {resume / 'accelerate'}: {str(err).splitlines()[0]}") from err
            if ema is not None:
                ema.to(self.device)  # accelerate loads custom states onto the CPU
            self.pos = _Position(**checkpointing.read_json(resume / "training_state.json"))
            _apply_learning_rate(optimizer, scheduler, plan.changes.get("train.learning_rate"))
            self._print(f"resumed from {resume} at step {self.pos.step}")

        tracking.start(self.accelerator, cfg.tracking, self.run_dir, config_to_dict(cfg))
        result = TrainResult(run_dir=self.run_dir, final_dir=self.run_dir / "final")
        progress = self._progress()
        transformer.train()
        try:
            while self.pos.step < cfg.train.max_steps:
                loss, stats = self._one_step(adapter, transformer, optimizer, scheduler, encoders, loader, params, ema)
                result.losses.append(loss)
                self._after_step(adapter, transformer, optimizer, scheduler, encoders, loss, stats, progress, ema)
        except torch.cuda.OutOfMemoryError as err:
            raise UserError(OOM_ADVICE) from err
        finally:
            if progress is not None:
                progress.close()
        result.bad_steps = self.pos.bad_total
        self._save_final(adapter, transformer, ema)
        result.exported_to = self._export_at_end()
        self.accelerator.end_training()
        self._print(self._summary(result))
        return result

    def _one_step(self, adapter, transformer, optimizer, scheduler, encoders, loader, params, ema) -> tuple[float, dict]:
        """One optimizer step = gradient_accumulation_steps micro-batches."""
        cfg = self.cfg
        t0 = time.perf_counter()
        losses, tokens, samples, densities, bad = [], 0, 0, [], False
        for micro in range(cfg.train.gradient_accumulation_steps):
            batch = next(loader)
            if batch.get("failed"):
                self.data_report.record_failures(batch["failed"])
            with self.accelerator.accumulate(transformer):
                if batch_size(batch) == 0:  # every clip failed to decode (counted above): still run a forward, so
                    if self._last_good is None:  # that DDP/ZeRO ranks stay in step, on the last good batch, as NaN
                        raise UserError("the first batch failed to decode entirely; check the videos (data.on_bad_video)")
                    loss, geometry = self._micro_step(adapter, transformer, encoders, self._last_good, micro)
                    loss = loss * float("nan")
                else:
                    self._last_good = batch
                    loss, geometry = self._micro_step(adapter, transformer, encoders, batch, micro)
                finite = self._all_finite(loss)
                if not finite:  # skip: a zero loss that still touches every trainable parameter keeps ranks in step
                    bad = True
                    loss = sum(p.sum() for p in params) * 0.0
                self.accelerator.backward(loss * (self.sp.size if self.sp is not None else 1))
                grad_norm = None
                if self.accelerator.sync_gradients:
                    grad_norm = self.accelerator.clip_grad_norm_(params, cfg.train.max_grad_norm)
                if not (bad and self.accelerator.sync_gradients and self.accelerator.distributed_type.value != "DEEPSPEED"):
                    optimizer.step()
                elif self.accelerator.scaler is not None:  # fp16: the skipped step must still reset the scaler
                    self.accelerator.scaler.update()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if finite:
                losses.append(float(loss.detach()))
            samples += batch_size(batch)
            tokens += batch_size(batch) * geometry.video_tokens
            if self.router is not None:
                densities.append(float(self.router.density()))
        if ema is not None and not bad:
            ema.step(params)
        self.pos.step += 1
        if bad:
            self.pos.bad_in_a_row += 1
            self.pos.bad_total += 1
            if self.pos.bad_in_a_row == 1:  # a bad streak starts: keep the checkpoint written before it
                self.pos.protected_checkpoint = self.pos.newest_checkpoint
            self._print(f"step {self.pos.step}: non-finite loss, step skipped ({self.pos.bad_total} so far)")
            if self.pos.bad_in_a_row >= cfg.train.max_bad_steps_in_a_row:
                raise UserError(self._bad_streak_message())
        else:
            self.pos.bad_in_a_row = 0
        dt = time.perf_counter() - t0
        world = self.dp_size  # ranks of one sequence-parallel group work on the same samples
        stats = {
            "lr": scheduler.get_last_lr()[0],
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "step_time_s": dt,
            "samples_per_s": samples * world / dt,
            "tokens_per_s": tokens * world / dt,
            "attention_density": sum(densities) / len(densities) if densities else 1.0,
            "bad_steps": self.pos.bad_total,
            **self.data_report.as_dict(),
        }
        if torch.cuda.is_available():
            stats["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        return (sum(losses) / len(losses) if losses else float("nan")), stats

    def _micro_step(self, adapter, transformer, encoders, batch, micro: int) -> tuple[torch.Tensor, VideoGeometry]:
        gen = torch.Generator().manual_seed(self._noise_seed(micro))
        latents, cond = self._conditioning(adapter, encoders, batch)
        frames, height, width = clip_shape(batch)
        geometry = self._geometry(adapter, frames, height, width)
        noise = torch.randn(latents.shape, generator=gen, dtype=torch.float32).to(self.device, latents.dtype)
        sigmas = adapter.sample_sigmas(latents.shape[0], gen, torch.device("cpu")).to(self.device)
        noisy, timesteps, target = adapter.training_pair(latents, noise, sigmas)
        if self.router is not None:
            self.router.begin_step()
        pred = adapter.predict(transformer, noisy.to(self._weight_dtype()), timesteps, cond)
        loss = F.mse_loss(pred.float(), target.float())
        return loss, geometry

    def _noise_seed(self, micro: int) -> int:
        c = self.cfg
        return (c.train.seed * 1_000_003 + self.pos.step * 1009 + micro * 101 + self.dp_rank) % (2**63)

    @torch.no_grad()
    def _conditioning(self, adapter, encoders, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if "latents" in batch:  # precomputed cache
            latents = batch["latents"].to(self.device, torch.float32)
            cond = {k: v.to(self.device) for k, v in batch["cond"].items()}
            return latents, cond
        pixels = batch["pixels"].to(self.device, torch.float32)
        latents = adapter.encode_videos(encoders, pixels).float()
        cond = adapter.encode_prompts(encoders, list(batch["captions"]))
        return latents, {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in cond.items()}

    def _all_finite(self, loss: torch.Tensor) -> bool:
        flag = torch.isfinite(loss.detach()).float().reshape(1)
        return bool(self.accelerator.gather(flag).min() > 0)

    def _after_step(self, adapter, transformer, optimizer, scheduler, encoders, loss, stats, progress, ema) -> None:
        cfg = self.cfg
        step = self.pos.step
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{loss:.4f}", density=f"{stats['attention_density']:.3f}")
        if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
            self.accelerator.log({"loss": loss, **stats}, step=step)
            if self.is_main:  # a plain local log next to wandb's (also what multi-process tests read)
                with open(self.run_dir / "metrics.jsonl", "a") as fh:
                    fh.write(json.dumps({"step": step, "loss": loss, **stats}) + "\n")
            if progress is None:
                self._print(f"step {step}/{cfg.train.max_steps} loss {loss:.4f} density {stats['attention_density']:.3f}")
        if step % cfg.train.checkpoint_every == 0 and step < cfg.train.max_steps:
            self._checkpoint_due = True
        if self._checkpoint_due and step < cfg.train.max_steps:
            if self.pos.bad_in_a_row:  # never save weights right after a bad step; the next good step saves them
                self._print(f"step {step}: checkpoint postponed (the last step had a non-finite loss)")
            else:
                self._save_checkpoint(transformer, ema)
                self._checkpoint_due = False
        v = cfg.validation
        if v.every_steps and v.prompts and step % v.every_steps == 0:
            self._validate(adapter, transformer, step)

    def _progress(self) -> Any:
        if not self.is_main:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.cfg.train.max_steps, initial=self.pos.step, desc="train", dynamic_ncols=True)

    # ------------------------------------------------------------------------------------------------------------
    # data

    def _make_loader(self, dataset: Any) -> Iterator[dict]:
        """Endless iterator over batches that records its position (epoch, batch) for resume."""
        from data.dataset import make_dataloader


        def batches() -> Iterator[dict]:
            while True:
                loader = make_dataloader(
                    dataset,
                    self.cfg.data,
                    batch_size=self.cfg.train.batch_size,
                    seed=self.cfg.train.seed,
                    epoch=self.pos.epoch,
                    rank=self.dp_rank,
                    world_size=self.dp_size,
                    skip_batches=self.pos.batches_in_epoch,
                )
                for batch in loader:
                    self.pos.batches_in_epoch += 1
                    yield batch
                self.pos.epoch += 1
                self.pos.batches_in_epoch = 0

        return batches()

    def _make_ema(self, params: list[torch.nn.Parameter]) -> Any:
        if not self.cfg.train.ema.enabled:
            return None
        from diffusers.training_utils import EMAModel

        return EMAModel(params, decay=self.cfg.train.ema.decay)

    # ------------------------------------------------------------------------------------------------------------
    # checkpoints, final weights, export

    def _meta(self) -> dict[str, Any]:
        c = self.cfg
        zero = 0
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        if plugin is not None:
            zero = int(plugin.zero_stage)
        return {
            "step": self.pos.step,
            "family": c.model.family,
            "mode": c.train.mode,
            "pretrained": c.model.pretrained,
            "revision": c.model.revision,
            "lora": config_to_dict(c.lora),
            "attention": config_to_dict(c.attention),
            "data": {"frames": c.data.frames, "height": c.data.height, "width": c.data.width, "fps": c.data.fps, "path": c.data.path},
            "train": {"max_steps": c.train.max_steps, "learning_rate": c.train.learning_rate, "batch_size": c.train.batch_size},
            "world_size": self.accelerator.num_processes,
            "zero_stage": zero,
            "ema": c.train.ema.enabled,
        }

    def _write_weights(self, folder: Path, transformer: torch.nn.Module, ema: Any) -> None:
        """Gather trainable weights (collective under ZeRO-3) and write them on the main process."""
        state = self.accelerator.get_state_dict(transformer)  # collective under ZeRO-3; None on other ranks there
        if not self.is_main:
            return
        unwrapped = self.accelerator.unwrap_model(transformer)
        if ema is not None:  # export the EMA weights: copy them into a detached state dict
            names = [n for n, p in unwrapped.named_parameters() if p.requires_grad]
            state = dict(state)
            for name, shadow in zip(names, ema.shadow_params):
                state[name] = shadow.detach().clone()
        if self.cfg.train.mode == "lora":
            from peft.utils import get_peft_model_state_dict

            lora = get_peft_model_state_dict(unwrapped, state_dict=state)
            checkpointing.write_weights(folder, lora_state=lora)
        else:
            checkpointing.write_weights(folder, lora_state=None, full_model=_FullModelWriter(unwrapped, state))
        checkpointing.write_json(folder / "meta.json", self._meta())

    def _save_checkpoint(self, transformer: torch.nn.Module, ema: Any) -> Path:
        final = self.run_dir / "checkpoints" / checkpointing.checkpoint_name(self.pos.step)
        tmp = checkpointing.staging_dir(final)
        if self.is_main:
            checkpointing.begin(final)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(tmp / "accelerate"))
        self._write_weights(tmp, transformer, ema)
        self.pos.newest_checkpoint = final.name
        if self.is_main:
            checkpointing.write_json(tmp / "training_state.json", self.pos.__dict__)
            save_config(self.cfg, tmp / "config.yaml")  # the recipe these weights were trained with (resume checks it)
        self.accelerator.wait_for_everyone()
        if self.is_main:
            checkpointing.commit(tmp, final)
            checkpointing.rotate(self.run_dir, self.cfg.train.checkpoints_keep, protect=self.pos.protected_checkpoint)
            self._print(f"checkpoint -> {final}")
        self.accelerator.wait_for_everyone()
        return final

    def _save_final(self, adapter: ModelAdapter, transformer: torch.nn.Module, ema: Any) -> None:
        final = self.run_dir / "final"
        tmp = checkpointing.staging_dir(final)
        if self.is_main:
            checkpointing.begin(final)
        self.accelerator.wait_for_everyone()
        self._write_weights(tmp, transformer, ema)
        if self.is_main:
            save_config(self.cfg, tmp / "config.yaml")
        self.accelerator.wait_for_everyone()
        if self.is_main:
            checkpointing.commit(tmp, final)
        self.accelerator.wait_for_everyone()

    def _export_at_end(self) -> Optional[Path]:
        if not self.cfg.export.at_end or not self.is_main:
            return None
        from train.exporting import export_checkpoint

        out = self.run_dir / "export"
        export_checkpoint(self.run_dir / "final", out, lora_formats=list(self.cfg.export.lora_formats), force=True)
        return out

    # ------------------------------------------------------------------------------------------------------------
    # validation

    def _validate(self, adapter: ModelAdapter, transformer: torch.nn.Module, step: int) -> None:
        if self._validator is None:
            from train.validation import Validator

            with self._no_zero3_init():
                self._validator = Validator(self.accelerator, adapter, self.cfg, transformer, self.encoders, self.run_dir)
        self._geometry(adapter, *self._validator.shape)  # a clear error for a validation shape the VAE can't take
        videos = self._validator.render(step)
        tracking.log_videos(self.accelerator, self.cfg.tracking, step, videos, fps=self.cfg.data.fps)
        if videos:
            self._print(f"validation videos -> {next(iter(videos.values())).parent}")

    def _summary(self, result: TrainResult) -> str:
        lines = [
            "done.",
            f"  run folder:      {self.run_dir}",
            f"  resolved config: {self.run_dir / 'config.yaml'}",
            f"  final weights:   {result.final_dir / 'weights'}",
            f"  checkpoints:     {self.run_dir / 'checkpoints'}",
        ]
        if result.losses:
            k = max(1, min(5, len(result.losses) // 2))
            first, last = result.losses[:k], result.losses[-k:]
            lines.append(f"  loss:            {sum(first) / k:.4f} (mean of the first {k} steps) -> {sum(last) / k:.4f} (last {k})")
        if result.bad_steps:
            lines.append(f"  skipped steps:   {result.bad_steps} (non-finite loss)")
        lines.extend(_data_summary(self.data_report))
        if self.cfg.tracking.report_to == "wandb":
            lines.append(f"  wandb:           {self.run_dir / 'wandb'}  (offline runs: `wandb sync <that folder>/offline-run-*`)")
        if result.exported_to is not None:
            lines.append(f"  export:          {result.exported_to}")
        return "\n".join(lines)

    def _bad_streak_message(self) -> str:
        text = f"{self.pos.bad_in_a_row} steps in a row had a NaN/inf loss (train.max_bad_steps_in_a_row); "
        ckpt = self.pos.protected_checkpoint
        if ckpt:
            path = self.run_dir / "checkpoints" / ckpt
            return text + (
                f"the last checkpoint before them is {path}: resume from it with a lower learning rate "
                f"(train.resume_from={path} train.learning_rate={self.cfg.train.learning_rate / 10:g}), or check the data"
            )
        return text + "no checkpoint was written before them: lower train.learning_rate (and start over), or check the data"


def _apply_learning_rate(optimizer: Any, scheduler: Any, change: Optional[tuple[Any, Any]]) -> None:
    """A resume with a new train.learning_rate: rescale the restored schedule (its base and current rates)."""
    if change is None:
        return
    old, new = change
    ratio = float(new) / float(old)
    inner = getattr(scheduler, "scheduler", scheduler)
    inner.base_lrs = [lr * ratio for lr in inner.base_lrs]
    for group in optimizer.param_groups:
        group["lr"] *= ratio
        if "initial_lr" in group:
            group["initial_lr"] *= ratio
    inner._last_lr = [group["lr"] for group in optimizer.param_groups]


def _drop_metrics_after(path: Path, step: int) -> None:
    """metrics.jsonl keeps one row per step: rows an interrupted run logged after its last checkpoint go."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if int(json.loads(line)["step"]) > step:
                continue
        except (ValueError, KeyError, TypeError):
            continue  # a line cut by the interruption
        keep.append(line + "\n")
    write_text_atomic(path, "".join(keep))


def _data_summary(report: Any) -> list[str]:
    """The data lines of the final summary: what was used and what was skipped (and why)."""
    if report is None:
        return []
    skipped = {r: n for r, n in report.skipped.items() if n}
    why = f" ({', '.join(f'{r}: {n}' for r, n in skipped.items())})" if skipped else ""
    lines = [f"  data:            {report.videos} videos, {report.kept} used ({report.clips} clips), "
             f"{report.total_skipped} skipped{why}"]
    if report.decode_failures:
        lines.append(f"  decode failures: {report.decode_failures} during training ({len(report.failed_videos)} videos; "
                     "each replaced by another clip)")
    return lines


class _FullModelWriter:
    """save_pretrained of a full fine-tune with the (possibly ZeRO-3-gathered) state dict."""

    def __init__(self, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
        self.model, self.state = model, state

    def save_pretrained(self, path: str, safe_serialization: bool = True) -> None:
        self.model.save_pretrained(path, state_dict=self.state, safe_serialization=safe_serialization)


def batch_size(batch: dict) -> int:
    return int(batch["batch_size"])


def clip_shape(batch: dict) -> tuple[int, int, int]:
    """Pixel (frames, height, width) of the clips of a batch (the collate functions put it beside the tensors)."""
    return tuple(int(x) for x in batch["clip_shape"])  # type: ignore[return-value]
