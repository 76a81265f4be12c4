"""Hooks: what a training run does besides the step itself (EMA, bad-step handling, validation, export).

The trainer (train/trainer.py) calls every hook at fixed points of its loop, in list order; a hook overrides the
points it needs. Adding a feature around the loop is one module here plus one line in :func:`default_hooks`.

Points, in the order a run meets them:

``on_loaded(run)``                  the model, its trainable parameters and the optimizer exist, before
                                    ``accelerator.prepare`` (a copy of the weights starts from the loaded ones)
``on_prepared(run)``                after ``accelerator.prepare``: move state to the device, register it for
                                    checkpointing (the registration order is the checkpoint's file order)
``on_resumed(run)``                 after ``accelerator.load_state`` of a resumed run
``on_optimizer_step(run, skipped)`` at the end of every optimizer step, inside its timing, after ``pos.step`` moved
                                    on; ``skipped``: the step had a non-finite loss and changed no weight
``on_step_end(run, loss)``          after the step was logged and any checkpoint written
``on_save_weights(run, state)``     the gathered trainable weights about to be written to a checkpoint or final/
                                    (main process); a hook may replace entries
``on_train_end(run, result)``       after final/ was written
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from train.hooks.base import Hook, Hooks

if TYPE_CHECKING:  # pragma: no cover
    from train.config_schema import RecipeConfig

__all__ = ["Hook", "Hooks", "default_hooks"]


def default_hooks(cfg: "RecipeConfig") -> Hooks:
    """The hooks a recipe asks for, in calling order (EMA before bad-step handling: a skipped step moves no
    average; validation after the checkpoint of the same step)."""
    from train.hooks.bad_steps import BadSteps
    from train.hooks.ema import EMA
    from train.hooks.export import ExportAtEnd
    from train.hooks.validation import Validation

    hooks: list[Hook] = []
    if cfg.train.ema.enabled:
        hooks.append(EMA(cfg.train.ema.decay))
    hooks.append(BadSteps(cfg.train.max_bad_steps_in_a_row))
    if cfg.validation.every_steps and cfg.validation.prompts:
        hooks.append(Validation(cfg.validation.every_steps))
    if cfg.export.at_end:
        hooks.append(ExportAtEnd(list(cfg.export.lora_formats)))
    return Hooks(hooks)
