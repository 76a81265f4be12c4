"""Whether the Triton kernels run under the CPU interpreter (``TRITON_INTERPRET=1``): the one place that reads it.

The interpreter must be chosen before any ``@triton.jit`` function is decorated (tests/conftest.py sets it at
import time), so this reads the environment on every call rather than caching a value read too early.
"""

from __future__ import annotations

import os

__all__ = ["interpreting"]


def interpreting() -> bool:
    """True when ``TRITON_INTERPRET=1``: Triton kernels then run on CPU tensors (tests), slowly and without tuning."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
