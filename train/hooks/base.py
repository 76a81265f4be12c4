"""The hook protocol (see train/hooks/__init__.py for the points and their order) and the list that calls them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

import torch

if TYPE_CHECKING:  # pragma: no cover
    from train.run import Run, TrainResult


class Hook:
    """No-op hooks; subclasses override what they need."""

    def on_loaded(self, run: "Run") -> None:
        pass

    def on_prepared(self, run: "Run") -> None:
        pass

    def on_resumed(self, run: "Run") -> None:
        pass

    def on_optimizer_step(self, run: "Run", skipped: bool) -> None:
        pass

    def on_step_end(self, run: "Run", loss: float) -> None:
        pass

    def on_save_weights(self, run: "Run", state: dict[str, torch.Tensor]) -> None:
        pass

    def on_train_end(self, run: "Run", result: "TrainResult") -> None:
        pass


class Hooks(Hook):
    """Several hooks called in order."""

    def __init__(self, hooks: Iterable[Hook]) -> None:
        self.hooks = list(hooks)

    def on_loaded(self, run: "Run") -> None:
        for hook in self.hooks:
            hook.on_loaded(run)

    def on_prepared(self, run: "Run") -> None:
        for hook in self.hooks:
            hook.on_prepared(run)

    def on_resumed(self, run: "Run") -> None:
        for hook in self.hooks:
            hook.on_resumed(run)

    def on_optimizer_step(self, run: "Run", skipped: bool) -> None:
        for hook in self.hooks:
            hook.on_optimizer_step(run, skipped)

    def on_step_end(self, run: "Run", loss: float) -> None:
        for hook in self.hooks:
            hook.on_step_end(run, loss)

    def on_save_weights(self, run: "Run", state: dict[str, torch.Tensor]) -> None:
        for hook in self.hooks:
            hook.on_save_weights(run, state)

    def on_train_end(self, run: "Run", result: "TrainResult") -> None:
        for hook in self.hooks:
            hook.on_train_end(run, result)
