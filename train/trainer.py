"""The fine-tuning loop as stages over one :class:`train.run.Run`.

A run goes through five stages (``Trainer.run``): *prepare* (generated inputs, recipe checks, data, the run folder;
nothing is written before the whole recipe checked out), *load* (model, optimizer, accelerate, attention,
encoders, hooks), *resume* (accelerate state and loop position of a checkpoint), *steps*, *finish* (final weights,
summary). The step itself is train/step.py; what happens around it (EMA, bad-step handling, validation, export)
lives in hooks (train/hooks/); the checkpoint folder format in train/checkpointing.py.

Everything distributed goes through accelerate (DDP or DeepSpeed ZeRO-2/3, chosen by the accelerate config
the run is launched with); everything model-specific goes through the family adapter (train/models/).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import torch

from train import checkpointing, tracking
from train.config import config_to_dict, dump_config, save_config
from train.config_schema import RecipeConfig
from train.errors import OOM_ADVICE, UserError
from train.hooks import default_hooks
from train.models import get_adapter
from train.run import Position, Run, TrainResult, no_zero3_init
from train.step import batches, one_step
from train.summary import summary

__all__ = ["Trainer", "TrainResult", "train"]


def train(cfg: RecipeConfig) -> TrainResult:
    return Trainer(cfg).run()


class Trainer:
    """The stages of one run. Subclasses (benchmarks) may override a stage or ``_install_attention``/``_one_step``."""

    def __init__(self, cfg: RecipeConfig) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.train.output_dir)
        self.accelerator = _make_accelerator(cfg, self.run_dir)
        self.step_speed: Optional[dict] = None  # what the load stage set up (tests and benchmarks read it)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def run(self) -> TrainResult:
        run = self.prepare()
        self.load(run)
        self.resume(run)
        result = self.steps(run)
        return self.finish(run, result)

    # ------------------------------------------------------------------------------------------------------------
    # prepare: everything before a weight is loaded; the run folder is written last, once the recipe checked out

    def prepare(self) -> Run:
        from accelerate.utils import set_seed

        from train.memory_fit import check_before_loading

        cfg = self.cfg
        self._create_inputs()
        set_seed(cfg.train.seed)
        sp = None
        if cfg.parallel.sequence_parallel_size > 1:
            from train.sequence_parallel import SequenceParallel

            sp = SequenceParallel.create(cfg.parallel.sequence_parallel_size)
        weight_dtype = _weight_dtype(cfg, self.accelerator)
        adapter = get_adapter(cfg.model.family)(
            cfg.model.pretrained,
            cfg.model.revision,
            weight_dtype,
            shift=cfg.train.timestep_shift,
            timestep_sampling=cfg.train.timestep_sampling,
        )
        run = Run(cfg=cfg, accelerator=self.accelerator, run_dir=self.run_dir, adapter=adapter, weight_dtype=weight_dtype,
                  hooks=default_hooks(cfg), sp=sp)
        run.geometry(cfg.data.frames, cfg.data.height, cfg.data.width)
        run.plan = self._check_recipe(run)  # nothing in the run folder is written before this passed
        check_before_loading(cfg, adapter, self.accelerator)  # one line, before any weight is loaded
        run.dataset, run.data_report = self._build_data(run)
        self._prepare_run_dir(run)
        return run

    def _create_inputs(self) -> None:
        """Generated inputs (tiny model, synthetic data) the recipe asks for, only into folders marked as generated."""
        from train.bootstrap import check_generated_inputs, create_missing_inputs
        from train.preflight import check_paths

        check_paths(self.cfg)
        check_generated_inputs(self.cfg)  # on every rank: the same error everywhere, before anything is written
        if self.is_main:
            for line in create_missing_inputs(self.cfg):
                print(f"created {line}", flush=True)
        self.accelerator.wait_for_everyone()

    def _check_recipe(self, run: Run) -> Any:
        """Everything about the recipe that can be checked before the run folder is touched: clip shapes for the
        VAE (data, buckets, validation), export formats, a reused output folder, resume compatibility."""
        from train.preflight import check_recipe
        from train.resume import plan_resume

        check_recipe(self.cfg, run.adapter)
        t = self.cfg.train
        earlier = bool(checkpointing.list_checkpoints(self.run_dir)) or (self.run_dir / "final").is_dir()
        if earlier and t.resume_from is None and not t.overwrite_output_dir:  # checked on every rank alike
            raise UserError(
                f"train.output_dir {self.run_dir} holds checkpoints or final weights of an earlier run; "
                "continue it with train.resume_from=latest, replace it with train.overwrite_output_dir=true, "
                "or choose another train.output_dir"
            )
        return plan_resume(self.cfg)

    def _build_data(self, run: Run) -> tuple[Any, Any]:
        """Clips decoded on the fly, or the precomputed latent cache when ``data.cache_dir`` is set
        (encoded here first when the folder holds no cache yet)."""
        cfg = self.cfg
        if cfg.data.cache_dir:
            from data.cache import open_cache

            if not (Path(cfg.data.cache_dir) / "manifest.json").is_file():
                from train.latents import precompute

                run.print(f"data.cache_dir {cfg.data.cache_dir} holds no cache yet: encoding the dataset once")
                with no_zero3_init(self.accelerator):  # every rank encodes its own shards with whole encoders
                    precompute(cfg, state=self.accelerator.state)
                self.accelerator.wait_for_everyone()
            dataset, report = open_cache(
                cfg.data, model_id=cfg.model.pretrained, revision=cfg.model.revision, family=cfg.model.family
            )
        else:
            from data.dataset import build_dataset

            dataset, report = build_dataset(cfg.data, run.adapter.frame_multiple, cfg.train.seed)
        run.print(f"{len(dataset)} clips; {report}")
        if len(dataset) == 0:
            raise UserError(f"the dataset is empty after filtering ({report}); check data.path, data.frames, data.fps")
        return dataset, report

    def _prepare_run_dir(self, run: Run) -> None:
        """The first write into the run folder, once the whole recipe is known to be usable."""
        from train.resume import drop_metrics_after, log_changes

        t, plan = self.cfg.train, run.plan
        if self.is_main:
            for note in plan.notes:
                run.print(note)
            if plan.checkpoint is None:  # a fresh run
                if t.overwrite_output_dir:
                    removed = checkpointing.remove_run_outputs(self.run_dir)
                    if removed:
                        run.print(f"train.overwrite_output_dir: removed the earlier run's {', '.join(removed)} in {self.run_dir}")
                else:  # a fresh run in a reused folder starts a fresh local log
                    for name in ("metrics.jsonl", "config-changes.jsonl"):
                        (self.run_dir / name).unlink(missing_ok=True)
            else:
                if t.overwrite_output_dir:
                    run.print("train.overwrite_output_dir is ignored: the run resumes (train.resume_from)")
                drop_metrics_after(self.run_dir / "metrics.jsonl", plan.step)  # rows the interrupted run logged later
                for key, (old, new) in plan.changes.items():
                    run.print(f"resume: {key} {old} -> {new} from step {plan.step + 1}")
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if plan.checkpoint is not None:
                log_changes(self.run_dir, plan.step, plan.changes)
            run.print("resolved config:\n" + dump_config(self.cfg))
            save_config(self.cfg, self.run_dir / "config.yaml")
        self.accelerator.wait_for_everyone()

    # ------------------------------------------------------------------------------------------------------------
    # load: model, optimizer, data iterator, accelerate, attention, encoders

    def load(self, run: Run) -> None:
        cfg = self.cfg
        run.transformer, run.params = self._build_model(run)
        run.optimizer, run.scheduler = self._build_optimizer(run.params)
        run.loader = batches(run)
        run.hooks.on_loaded(run)
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        if plugin is not None:  # what accelerate cannot fill: micro-batch, clipping, ZeRO-3 buckets (diffusers width)
            from train.deepspeed_config import fill_auto_values

            fill_auto_values(plugin.deepspeed_config, run.transformer, micro_batch=cfg.train.batch_size,
                             max_grad_norm=cfg.train.max_grad_norm)
        run.transformer, run.optimizer, run.scheduler = self.accelerator.prepare(run.transformer, run.optimizer, run.scheduler)
        run.hooks.on_prepared(run)
        self._install_attention(run)
        if cfg.attention.type == "svg2":  # its warm-start centroids are part of an exact resume
            self.accelerator.register_for_checkpointing(run.router)
        if not cfg.data.cache_dir:  # with a latent cache the VAE and text encoders are not needed to train
            with no_zero3_init(self.accelerator):  # frozen encoders stay whole on every rank
                run.encoders = run.adapter.load_encoders(run.device)

    def _build_model(self, run: Run) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
        from train import step_speed  # gradient checkpointing (and its policy), regional compilation

        cfg = self.cfg
        transformer = run.adapter.load_transformer()  # in the adapter's dtype (keeps the family's fp32 modules)
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
        run.step_speed = self.step_speed = step_speed.configure_for_trainer(
            transformer, cfg.train, run.adapter, self.accelerator, run.print,
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

    def _install_attention(self, run: Run) -> None:
        """Sparse attention processors (once: the router follows the clip shape of every forward by itself),
        and the sequence-parallel hooks when asked for."""
        base = run.geometry(self.cfg.data.frames, self.cfg.data.height, self.cfg.data.width)
        unwrapped = self.accelerator.unwrap_model(run.transformer)
        run.router = run.adapter.install_attention(unwrapped, self.cfg.attention, base)
        if run.sp is not None:
            run.adapter.install_sequence_parallel(unwrapped, run.sp)
            run.router.sequence_parallel = run.sp

    # ------------------------------------------------------------------------------------------------------------
    # resume

    def resume(self, run: Run) -> None:
        """Continue from the checkpoint the resume plan chose (nothing to do for a fresh run)."""
        from train.resume import apply_learning_rate

        checkpoint = run.plan.checkpoint
        if checkpoint is None:
            return
        try:
            self.accelerator.load_state(str(checkpoint / checkpointing.ACCELERATE_DIR))
        except (RuntimeError, OSError, ValueError, EOFError) as err:
            where = checkpoint / checkpointing.ACCELERATE_DIR
            raise UserError(f"train.resume_from: cannot load {where}: {str(err).splitlines()[0]}") from err
        run.hooks.on_resumed(run)
        run.pos = Position(**checkpointing.read_position(checkpoint))
        apply_learning_rate(run.optimizer, run.scheduler, run.plan.changes.get("train.learning_rate"))
        run.print(f"resumed from {checkpoint} at step {run.pos.step}")

    # ------------------------------------------------------------------------------------------------------------
    # steps

    def steps(self, run: Run) -> TrainResult:
        cfg = self.cfg
        tracking.start(self.accelerator, cfg.tracking, self.run_dir, config_to_dict(cfg))
        result = TrainResult(run_dir=self.run_dir, final_dir=self.run_dir / "final")
        progress = _progress(run)
        run.transformer.train()
        try:
            while run.pos.step < cfg.train.max_steps:
                loss, stats = self._one_step(run)
                result.losses.append(loss)
                self._after_step(run, loss, stats, progress)
        except torch.cuda.OutOfMemoryError as err:
            raise UserError(OOM_ADVICE) from err
        finally:
            if progress is not None:
                progress.close()
        result.bad_steps = run.pos.bad_total
        return result

    def _one_step(self, run: Run) -> tuple[float, dict]:
        """One optimizer step (train/step.py); benchmarks override this to profile it."""
        return one_step(run)

    def _after_step(self, run: Run, loss: float, stats: dict, progress: Any) -> None:
        """Log the step, write a checkpoint when one is due (never right after a bad step), then the hooks."""
        t = self.cfg.train
        step = run.pos.step
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{loss:.4f}", density=f"{stats['attention_density']:.3f}")
        if step % t.log_every == 0 or step == t.max_steps:
            self.accelerator.log({"loss": loss, **stats}, step=step)
            if self.is_main:  # a plain local log next to wandb's (also what multi-process tests read)
                with open(self.run_dir / "metrics.jsonl", "a") as fh:
                    fh.write(json.dumps({"step": step, "loss": loss, **stats}) + "\n")
            if progress is None:
                run.print(f"step {step}/{t.max_steps} loss {loss:.4f} density {stats['attention_density']:.3f}")
        if step % t.checkpoint_every == 0 and step < t.max_steps:
            run.checkpoint_due = True
        if run.checkpoint_due and step < t.max_steps:
            if run.pos.bad_in_a_row:  # the next good step saves them
                run.print(f"step {step}: checkpoint postponed (the last step had a non-finite loss)")
            else:
                checkpointing.save_checkpoint(run)
                run.checkpoint_due = False
        run.hooks.on_step_end(run, loss)

    # ------------------------------------------------------------------------------------------------------------
    # finish

    def finish(self, run: Run, result: TrainResult) -> TrainResult:
        checkpointing.save_final(run)
        run.hooks.on_train_end(run, result)
        self.accelerator.end_training()
        run.print(summary(run, result))
        return result


# ----------------------------------------------------------------------------------------------------------------
# setup helpers and the final summary


def _make_accelerator(cfg: RecipeConfig, run_dir: Path) -> Any:
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

    precision = cfg.train.mixed_precision
    if not torch.cuda.is_available() and precision != "no":
        precision = "no"  # CPU autocast in bf16 is slow and the Triton interpreter mishandles bf16
    launched_distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1  # set by accelerate launch / torchrun
    handlers = [InitProcessGroupKwargs(backend="gloo")] if launched_distributed and not torch.cuda.is_available() else []
    return Accelerator(
        mixed_precision=precision,
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        log_with=tracking.tracker_name(cfg.tracking),
        project_config=ProjectConfiguration(project_dir=str(run_dir)),
        kwargs_handlers=handlers,
    )


def _weight_dtype(cfg: RecipeConfig, accelerator: Any) -> torch.dtype:
    precision = accelerator.mixed_precision
    if cfg.train.mode == "full" or precision == "no":
        return torch.float32
    return torch.bfloat16 if precision == "bf16" else torch.float16


def _progress(run: Run) -> Any:
    if not run.is_main:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=run.cfg.train.max_steps, initial=run.pos.step, desc="train", dynamic_ncols=True)
