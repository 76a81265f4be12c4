"""Non-finite losses: the step skips them (train/trainer.py zeroes the loss so every rank stays in step); this hook
counts them, keeps the checkpoint written before a streak from rotation, and stops the run after
``train.max_bad_steps_in_a_row`` in a row with the resume advice."""

from __future__ import annotations

from typing import TYPE_CHECKING

from train.checkpointing import checkpoint_path
from train.errors import UserError
from train.hooks.base import Hook

if TYPE_CHECKING:  # pragma: no cover
    from train.run import Run


class BadSteps(Hook):
    def __init__(self, max_in_a_row: int) -> None:
        self.max_in_a_row = max_in_a_row

    def on_optimizer_step(self, run: "Run", skipped: bool) -> None:
        pos = run.pos
        if not skipped:
            pos.bad_in_a_row = 0
            return
        pos.bad_in_a_row += 1
        pos.bad_total += 1
        if pos.bad_in_a_row == 1:  # a bad streak starts: keep the checkpoint written before it
            pos.protected_checkpoint = pos.newest_checkpoint
        run.print(f"step {pos.step}: non-finite loss, step skipped ({pos.bad_total} so far)")
        if pos.bad_in_a_row >= self.max_in_a_row:
            raise UserError(streak_message(run))


def streak_message(run: "Run") -> str:
    text = f"{run.pos.bad_in_a_row} steps in a row had a NaN/inf loss (train.max_bad_steps_in_a_row); "
    ckpt = run.pos.protected_checkpoint
    if ckpt:
        path = checkpoint_path(run.run_dir, ckpt)
        return text + (
            f"the last checkpoint before them is {path}: resume from it with a lower learning rate "
            f"(train.resume_from={path} train.learning_rate={run.cfg.train.learning_rate / 10:g}), or check the data"
        )
    return text + "no checkpoint was written before them: lower train.learning_rate (and start over), or check the data"
