"""Validation videos every ``validation.every_steps`` steps (train/validation.py renders them), logged to the
tracker; the pipeline is built on first use, around the live transformer."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from train import tracking
from train.hooks.base import Hook
from train.run import no_zero3_init

if TYPE_CHECKING:  # pragma: no cover
    from train.run import Run


class Validation(Hook):
    def __init__(self, every_steps: int) -> None:
        self.every_steps = every_steps
        self.validator: Any = None  # train.validation.Validator

    def on_step_end(self, run: "Run", loss: float) -> None:
        step = run.pos.step
        if step % self.every_steps:
            return
        if self.validator is None:
            from train.validation import Validator

            with no_zero3_init(run.accelerator):
                self.validator = Validator(run.accelerator, run.adapter, run.cfg, run.transformer, run.encoders, run.run_dir)
        run.geometry(*self.validator.shape)  # a clear error for a validation shape the VAE can't take
        videos = self.validator.render(step)
        tracking.log_videos(run.accelerator, run.cfg.tracking, step, videos, fps=run.cfg.data.fps)
        if videos:
            run.print(f"validation videos -> {next(iter(videos.values())).parent}")
