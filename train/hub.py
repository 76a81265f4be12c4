"""Upload an exported folder to the Hugging Face Hub.

The token is never handled here: ``HfApi`` finds it itself (``HF_TOKEN`` or the cached ``hf auth login``), so
it cannot end up in our logs, files or error messages. Errors are turned into one line that says what to do;
any text that could echo the token is scrubbed before it is raised.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Optional

from train.errors import UserError


class HubError(UserError):
    """The upload could not be done (offline, not logged in, not allowed); the message says what to change."""


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _scrub(text: str) -> str:
    """Remove the token from a message in case a library error quotes it."""
    from huggingface_hub import get_token

    token = get_token()
    if token:
        text = text.replace(token, "***")
    return text


def _status_code(err: BaseException) -> Optional[int]:
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None)


def check_repo_id(repo_id: str) -> None:
    """'name' or 'namespace/name' with the Hub's characters; checked before any long export work."""
    if not isinstance(repo_id, str) or not re.fullmatch(r"(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*", repo_id) \
            or ".." in repo_id or repo_id.endswith((".", "-")) or len(repo_id) > 96:
        raise ValueError(f"--push-to-hub: expected a repo id like 'user/name', got {repo_id!r}")


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    commit_message: Optional[str] = None,
    api: Any = None,
) -> str:
    """Create ``repo_id`` (a model repo; kept if it exists) and upload ``folder`` to it; returns the repo URL.

    ``api`` is an ``HfApi``-like object (``create_repo``, ``upload_folder``); tests pass a stub.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"--push-to-hub: {folder} is not a folder")
    check_repo_id(repo_id)
    if api is None:
        if _offline():
            raise HubError("--push-to-hub: the Hugging Face Hub is offline here (HF_HUB_OFFLINE is set); "
                           f"upload later with `hf upload {repo_id} {folder}`")
        from huggingface_hub import HfApi, get_token

        if not get_token():
            raise HubError("--push-to-hub: no Hugging Face token found; set HF_TOKEN or run `hf auth login`")
        api = HfApi()
    message = commit_message or f"Upload {folder.name} (longvideo-sparse-ft export)"
    try:
        url = api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model", commit_message=message)
    except Exception as err:  # every failure becomes one actionable line
        raise HubError(_explain(err, repo_id)) from None
    return str(getattr(url, "url", url) or f"https://huggingface.co/{repo_id}")


def _explain(err: BaseException, repo_id: str) -> str:
    code = _status_code(err)
    name = type(err).__name__
    if code in (401, 403):
        return (f"--push-to-hub: the Hub refused access to {repo_id!r} (HTTP {code}); check that your token "
                "(HF_TOKEN or `hf auth login`) has write access to that namespace")
    if code == 404 or name == "RepositoryNotFoundError":
        return f"--push-to-hub: repository {repo_id!r} not found and could not be created (HTTP 404)"
    if name == "OfflineModeIsEnabled" or _is_connection_error(err):
        return f"--push-to-hub: cannot reach the Hugging Face Hub ({name}); check the network and retry"
    first = _scrub(str(err)).strip().splitlines()
    return f"--push-to-hub: upload to {repo_id!r} failed: {name}: {first[0] if first else ''}".rstrip(": ")


def _is_connection_error(err: BaseException) -> bool:
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, (ConnectionError, TimeoutError)) or "Connect" in type(err).__name__ or "Timeout" in type(err).__name__:
            return True
        err = err.__cause__ or err.__context__  # type: ignore[assignment]
    return False
