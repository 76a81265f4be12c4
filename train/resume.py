"""What a resume continues from, and which recipe changes it may apply.

Rules (docs/training.md, "Resuming"):

* ``train.resume_from=latest`` takes the newest checkpoint of ``train.output_dir`` that is complete and undamaged;
  a damaged one is skipped with a warning naming the broken file. With no checkpoint at all it starts a fresh run
  and says so, unless the folder holds an earlier run's final weights (then it is an error: nothing to continue).
* ``train.resume_from=<folder>`` takes exactly that checkpoint; a damaged one is an error naming the file.
* The recipe must be the one the checkpoint was trained with, except for :data:`RESUME_MAY_CHANGE`; the changes
  are applied and logged (stdout and ``<run>/config-changes.jsonl``), so ``config.yaml`` always says what runs now.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from data.cache import flatten
from train import checkpointing
from train.config import ConfigError, config_to_dict, load_config, write_text_atomic
from train.config_schema import RecipeConfig

# Keys a resume applies; every other difference from the checkpoint's recipe is refused.
RESUME_APPLIES = ("train.learning_rate", "train.max_steps")
# Keys that do not change what is trained: where and how often things are saved, logged, rendered or exported,
# and how the same computation is carried out (memory/kernel choices).
RESUME_BOOKKEEPING_PREFIXES = (
    "train.resume_from", "train.overwrite_output_dir", "train.output_dir", "train.checkpoint_every",
    "train.checkpoints_keep", "train.log_every", "train.max_bad_steps_in_a_row", "train.gradient_checkpointing",
    "train.checkpoint_policy", "train.compile",
    "attention.backend", "data.num_workers", "validation.", "tracking.", "export.",
)
RESUME_MAY_CHANGE = RESUME_APPLIES + RESUME_BOOKKEEPING_PREFIXES


@dataclass
class ResumePlan:
    checkpoint: Optional[Path] = None  # None: a fresh run
    step: int = 0
    changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # key -> (checkpoint's value, new value)
    notes: list[str] = field(default_factory=list)  # printed by the trainer (fallbacks, "nothing to resume")


def _may_change(key: str) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in RESUME_MAY_CHANGE)


def recipe_of(checkpoint: Path, run_dir: Path) -> Optional[RecipeConfig]:
    """The recipe the checkpoint was trained with: its own config.yaml, else the run's (older checkpoints)."""
    name = checkpointing.RECIPE_FILE
    for path in (checkpoint / name, checkpoint.parent.parent / name, run_dir / name):
        if path.is_file():
            try:
                return load_config(path)
            except ConfigError as err:
                raise ConfigError(f"train.resume_from: the recipe saved with {checkpoint} cannot be read: {err}") from None
    return None


def compare(old: RecipeConfig, new: RecipeConfig) -> dict[str, tuple[Any, Any]]:
    """Differences that a resume applies; raises ConfigError for any it cannot."""
    a, b = flatten(config_to_dict(old)), flatten(config_to_dict(new))
    diffs = {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
    refused = [k for k in diffs if not _may_change(k)]
    if refused:
        shown = "; ".join(f"{k}: {diffs[k][0]!r} -> {diffs[k][1]!r}" for k in refused[:5])
        more = f" (and {len(refused) - 5} more)" if len(refused) > 5 else ""
        raise ConfigError(
            f"train.resume_from: the recipe differs from the one the checkpoint was trained with: {shown}{more}. "
            f"A resume may change only {', '.join(RESUME_APPLIES)} (and keys that do not change what is trained: where "
            "and how often it saves, logs, validates and exports, gradient checkpointing, the attention backend); "
            "start a new run (another train.output_dir) to change the rest"
        )
    return {k: v for k, v in diffs.items() if k in RESUME_APPLIES}


def _candidates(run_dir: Path, resume_from: str) -> tuple[list[Path], bool]:
    if resume_from == "latest":
        return list(reversed(checkpointing.list_checkpoints(run_dir))), True
    return [Path(resume_from)], False


def plan_resume(cfg: RecipeConfig) -> ResumePlan:
    """Where the run continues from; raises ConfigError for a damaged explicit checkpoint, a recipe change a
    resume cannot apply, or ``train.max_steps`` not beyond the checkpoint's step. Reads only."""
    t = cfg.train
    run_dir = Path(t.output_dir)
    plan = ResumePlan()
    if t.resume_from is None:
        return plan
    candidates, latest = _candidates(run_dir, t.resume_from)
    problems = []
    for folder in candidates:
        problem = checkpointing.damage(folder)
        if problem is None:
            plan.checkpoint = folder
            break
        if not latest:
            raise ConfigError(f"train.resume_from: cannot resume from {folder}: {problem}")
        problems.append(problem)
        plan.notes.append(f"warning: skipping damaged checkpoint {folder.name}: {problem}")
    if plan.checkpoint is None:
        if candidates:
            raise ConfigError(
                f"train.resume_from=latest: every checkpoint in {run_dir / 'checkpoints'} is damaged ({problems[0]}); "
                "resume from a copy, or start over with train.overwrite_output_dir=true"
            )
        if (run_dir / "final").is_dir():
            raise ConfigError(
                f"train.resume_from=latest: {run_dir} holds a finished run (final/) but no checkpoint to continue from; "
                "start over with train.overwrite_output_dir=true or choose another train.output_dir"
            )
        plan.notes.append(f"train.resume_from=latest: no checkpoint in {run_dir / 'checkpoints'} yet; starting a fresh run")
        return plan
    if plan.notes:
        plan.notes.append(f"resuming from {plan.checkpoint.name}, the newest undamaged checkpoint")
    state = checkpointing.read_position(plan.checkpoint)
    plan.step = int(state.get("step", 0))
    if t.max_steps <= plan.step:
        raise ConfigError(
            f"train.max_steps={t.max_steps}: the checkpoint {plan.checkpoint} is at step {plan.step} already; "
            "raise train.max_steps to train further"
        )
    old = recipe_of(plan.checkpoint, run_dir)
    if old is None:
        plan.notes.append(f"warning: no recipe saved with {plan.checkpoint}; cannot check that the recipe is unchanged")
    else:
        plan.changes = compare(old, cfg)
    return plan


def log_changes(run_dir: Path, step: int, changes: dict[str, tuple[Any, Any]]) -> None:
    """Append the applied changes to ``<run>/config-changes.jsonl`` (one row per key)."""
    if not changes:
        return
    with open(Path(run_dir) / "config-changes.jsonl", "a") as fh:
        for key, (old, new) in changes.items():
            fh.write(json.dumps({"step": step, "key": key, "from": old, "to": new}) + "\n")


def apply_learning_rate(optimizer: Any, scheduler: Any, change: Optional[tuple[Any, Any]]) -> None:
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


def drop_metrics_after(path: Path, step: int) -> None:
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
