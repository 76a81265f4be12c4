"""train/launcher.py: a failed worker's exit code (2 for our one-line user errors) becomes launch.sh's, and only
other failures get a note (the end-to-end behaviour is in tests/test_launch.py)."""

from __future__ import annotations

from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

from train.launcher import _exit_code


def _failure(rank: int, code: int) -> ProcessFailure:
    return ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=code, error_file="/nonexistent/error.json")


def test_user_error_exit_code_passes_through_silently() -> None:
    assert _exit_code({1: _failure(1, 2), 0: _failure(0, 2)}) == (2, None)


def test_other_codes_and_signals_are_named_for_the_lowest_failed_rank() -> None:
    assert _exit_code({3: _failure(1, 1), 2: _failure(0, 7)}) == (7, "launch: worker rank 2 exited with code 7")
    code, note = _exit_code({0: _failure(0, -6)})
    assert code == 134 and note == "launch: worker rank 0 was killed by signal SIGABRT"
