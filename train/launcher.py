"""``accelerate launch`` as launch.sh runs it: a failed run ends with the trainer's own ``error: ...`` line and its
exit code, not with a launcher traceback.

accelerate's ``--quiet`` only silences the single-process launcher (and DeepSpeed's non-standard multi-node
launchers) and turns every failure into exit code 1; the torchrun-based launchers used for DDP and DeepSpeed
(``torch.distributed.run``) raise ``ChildFailedError`` with a multi-line report after the worker has already
printed why it stopped. Here the public launch command of accelerate runs unchanged, and those two exceptions
become the worker's exit code (2 for a user error, whose one line the worker printed).

    python train/launcher.py [accelerate launch arguments] train/finetune.py --config RECIPE [key=value ...]
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
from typing import Optional


def _exit_code(failures: dict) -> tuple[int, Optional[str]]:
    """(exit code, note) of the first failed worker (lowest global rank); signals as 128 + signal number."""
    rank = min(failures)
    code = int(failures[rank].exitcode)
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
        return 128 - code, f"launch: worker rank {rank} was killed by signal {name}"
    return code, None if code == 2 else f"launch: worker rank {rank} exited with code {code}"


def main(argv: Optional[list[str]] = None) -> int:
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args(argv)
    # torch elastic logs every failed worker at ERROR level before raising; the worker has said why already
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        launch_command(args)
    except subprocess.CalledProcessError as err:  # single process / multi-node launchers
        code = err.returncode if err.returncode > 0 else 128 - err.returncode
        if code != 2:
            print(f"launch: the training process exited with code {err.returncode}", file=sys.stderr)
        return code
    except ChildFailedError as err:  # torchrun-based launchers (DDP, DeepSpeed on one node or standard multi-node)
        code, note = _exit_code(err.failures)
        if note:
            print(note, file=sys.stderr)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
