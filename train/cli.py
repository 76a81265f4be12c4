"""What every entry point shares: user errors become one clear line and exit code 2.

The entry points (``train/finetune.py``, ``export.py``, ``sample.py``, ``precompute.py``; installed as the
``longvideo-*`` console scripts) each define ``main(argv=None) -> int`` as ``run_main(lambda: run(argv))``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable


def run_main(main: Callable[[], object]) -> int:
    """Run ``main``; user-facing errors become ``error: <message>`` on stderr and exit code 2.

    An int that ``main`` returns is its exit code (so wrapping an entry point's own ``main`` keeps its code).
    """
    from train.config import ConfigError
    from train.errors import UserError

    try:
        result = main()
    except (ConfigError, UserError, FileNotFoundError, ValueError, TypeError) as err:
        if isinstance(err, (ValueError, TypeError)) and not _is_user_facing(err):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def _is_user_facing(err: BaseException) -> bool:
    """ValueErrors from our own validation (config, adapters, sparse_attn argument checks) are meant for users."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    origin = tb.tb_frame.f_code.co_filename if tb is not None else ""
    root = str(Path(__file__).resolve().parents[1])
    return origin.startswith(root) and "/.venv/" not in origin
