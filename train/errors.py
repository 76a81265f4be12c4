"""Errors meant for the person running a command: entry points print the message as one line and exit 2."""

from __future__ import annotations


class UserError(RuntimeError):
    """A problem with the user's input or environment (not a bug); the message says what to change."""


OOM_ADVICE = (
    "CUDA out of memory. Options, cheapest first: train.gradient_checkpointing=true; fewer frames (data.frames) "
    "or a smaller resolution; DeepSpeed ZeRO-3 (launch.sh --zero 3, or accelerate --config_file "
    "configs/accelerate/deepspeed_zero3.yaml); sequence parallelism across GPUs (parallel.sequence_parallel_size=N)."
)
