"""Tell a local path from a Hugging Face Hub id, so that a mistyped path is never sent to the Hub.

A Hub id is ``owner/name`` (one slash, word characters, dots and dashes). Anything else, or anything whose
first part exists here (``data/clips`` while ``./data`` is a folder), is a local path: a missing one is reported
as missing at once instead of after the Hub client's retries.
"""

from __future__ import annotations

import re
from pathlib import Path

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def has_hub_id_form(name: str) -> bool:
    """``owner/name`` as the Hub spells ids (whether or not a local folder of that name exists too)."""
    return bool(_HUB_ID.fullmatch(name)) and not name.startswith(".")


def looks_local(name: str) -> bool:
    """True for an existing path or a name that can only be a path; False for a plausible Hub id."""
    if not name or Path(name).expanduser().exists():
        return True
    if name.startswith(("./", "../", "/", "~", ".\\")) or name in (".", "..") or "\\" in name:
        return True
    if not _HUB_ID.fullmatch(name):
        return True
    return Path(name.split("/", 1)[0]).exists()
