"""Imported by the entry-point files only when they run as files (``python train/<x>.py``, also under
``accelerate launch``): Python then puts ``train/`` itself, not the repository, first on ``sys.path``, which is why
this module is found under its bare name. It puts the repository root on ``sys.path`` so that ``train``, ``data``
and ``sparse_attn`` import without an install. Console scripts and ``python -m train.<x>`` never need it.
"""

import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
