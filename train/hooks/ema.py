"""Exponential moving average of the trainable weights (diffusers' EMAModel): stepped after every good optimizer
step, saved with the accelerate state, and written instead of the live weights to checkpoints and final/."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from train.hooks.base import Hook

if TYPE_CHECKING:  # pragma: no cover
    from train.run import Run


class EMA(Hook):
    def __init__(self, decay: float) -> None:
        self.decay = decay
        self.model: Any = None  # diffusers.training_utils.EMAModel, made in on_loaded

    def on_loaded(self, run: "Run") -> None:
        """Start the averages from the trainable weights as loaded (before accelerate wraps the model)."""
        from diffusers.training_utils import EMAModel

        self.model = EMAModel(run.params, decay=self.decay)

    def on_prepared(self, run: "Run") -> None:
        self.model.to(run.device)
        run.accelerator.register_for_checkpointing(self.model)

    def on_resumed(self, run: "Run") -> None:
        self.model.to(run.device)  # accelerate loads custom states onto the CPU

    def on_optimizer_step(self, run: "Run", skipped: bool) -> None:
        if not skipped:
            self.model.step(run.params)

    def on_save_weights(self, run: "Run", state: dict[str, torch.Tensor]) -> None:
        unwrapped = run.accelerator.unwrap_model(run.transformer)
        names = [n for n, p in unwrapped.named_parameters() if p.requires_grad]
        for name, shadow in zip(names, self.model.shadow_params):
            state[name] = shadow.detach().clone()
