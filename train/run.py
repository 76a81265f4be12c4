"""The objects of one training run in one typed place, shared by the trainer's stages and its hooks.

``Run`` is filled in stages (train/trainer.py): *prepare* sets what exists before any weight is loaded (accelerator,
adapter, resume plan, dataset), *load* adds the model, optimizer, data iterator and attention router. ``Position``
is the part that a checkpoint saves (``training_state.json``) so that a resume continues exactly.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional

import torch

from train.config_schema import RecipeConfig
from train.geometry import VideoGeometry

if TYPE_CHECKING:  # pragma: no cover
    from train.hooks import Hooks
    from train.models.base import ModelAdapter
    from train.resume import ResumePlan


@dataclass
class Position:
    """Where the loop is; saved in training_state.json so that a resume continues exactly."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    bad_in_a_row: int = 0
    bad_total: int = 0
    newest_checkpoint: Optional[str] = None  # folder name of the last checkpoint written
    protected_checkpoint: Optional[str] = None  # the last one written before the latest run of bad steps


@dataclass
class TrainResult:
    run_dir: Path
    final_dir: Path
    losses: list[float] = field(default_factory=list)  # one per optimizer step, mean over micro-batches
    bad_steps: int = 0
    exported_to: Optional[Path] = None


@dataclass
class Run:
    """Everything one run holds. Set by *prepare*: cfg .. data_report; set by *load*: transformer .. step_speed;
    ``pos`` by *resume* and the steps."""

    cfg: RecipeConfig
    accelerator: Any  # accelerate.Accelerator
    run_dir: Path
    adapter: "ModelAdapter"
    weight_dtype: torch.dtype
    hooks: "Hooks"
    sp: Any = None  # train.sequence_parallel.SequenceParallel when parallel.sequence_parallel_size > 1
    plan: Optional["ResumePlan"] = None  # where the run continues from (a fresh run: plan.checkpoint is None)
    dataset: Any = None
    data_report: Any = None  # data.dataset.SkipReport: skipped videos by reason, decode failures
    transformer: Optional[torch.nn.Module] = None  # as prepared by accelerate (DDP / DeepSpeed engine)
    params: list[torch.nn.Parameter] = field(default_factory=list)  # the trainable ones
    optimizer: Any = None
    scheduler: Any = None
    loader: Optional[Iterator[dict]] = None  # endless; advances pos.epoch / pos.batches_in_epoch
    encoders: Any = None  # None with a latent cache
    router: Any = None  # train.attention.AttentionRouter
    step_speed: Optional[dict] = None  # what train/step_speed.py set up (checkpointing policy, compiled blocks)
    pos: Position = field(default_factory=Position)
    geometries: dict[tuple[int, int, int], VideoGeometry] = field(default_factory=dict)
    last_good: Optional[dict] = None  # last batch that decoded (stand-in for an all-failed batch)
    checkpoint_due: bool = False  # a checkpoint step fell on a bad step: write it after the next good one

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def dp_rank(self) -> int:
        return self.sp.dp_rank if self.sp is not None else self.accelerator.process_index

    @property
    def dp_size(self) -> int:
        return self.sp.dp_size if self.sp is not None else self.accelerator.num_processes

    def print(self, text: str) -> None:
        if self.is_main:
            print(text, flush=True)

    def geometry(self, frames: int, height: int, width: int) -> VideoGeometry:
        """The adapter's geometry of a clip shape (cached; raises a clear error for a shape the VAE can't take)."""
        key = (frames, height, width)
        if key not in self.geometries:
            self.geometries[key] = self.adapter.geometry(frames, height, width)
        return self.geometries[key]


@contextmanager
def no_zero3_init(accelerator: Any) -> Iterator[None]:
    """Under ZeRO-3, transformers partitions every model it loads; frozen encoders must stay whole.

    (accelerate's ``zero3_init_context_manager(enable=False)`` leaves transformers' ZeRO-3 switch on in
    accelerate 1.15, so the switch is cleared and restored here through transformers' own setters.)
    """
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None or getattr(plugin, "dschf", None) is None:
        yield
        return
    from transformers.integrations import set_hf_deepspeed_config, unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(plugin.dschf)
