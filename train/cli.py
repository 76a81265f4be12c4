"""What every entry point shares: make the repository importable, turn user errors into one clear line."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable


def ensure_repo_on_path() -> None:
    """Entry points run as ``python train/x.py``; make ``train``/``data``/``sparse_attn`` importable without install."""
    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)


def run_main(main: Callable[[], object]) -> int:
    """Run ``main``; user-facing errors become ``error: <message>`` on stderr and exit code 2."""
    from train.config import ConfigError
    from train.errors import UserError

    try:
        main()
    except (ConfigError, UserError, FileNotFoundError, ValueError, TypeError) as err:
        if isinstance(err, (ValueError, TypeError)) and not _is_user_facing(err):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def _is_user_facing(err: BaseException) -> bool:
    """ValueErrors from our own validation (config, adapters, sparse_attn argument checks) are meant for users."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    origin = tb.tb_frame.f_code.co_filename if tb is not None else ""
    root = str(Path(__file__).resolve().parents[1])
    return origin.startswith(root) and "/.venv/" not in origin
