"""Atomic writes and safe loading for every file the project produces.

Everything goes through write-to-temp-then-rename, so a run killed mid-write leaves the previous
complete file (or none), never a truncated one. Loading never unpickles: training checkpoints use
``torch.load(weights_only=True)`` and shipped weights use safetensors with a SHA-256 sidecar.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CheckpointError",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "load_checkpoint",
    "save_checkpoint",
    "sha256_file",
]


class CheckpointError(RuntimeError):
    """A checkpoint or weight file is missing, corrupted, foreign, or does not match."""


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a text file atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write a JSON file atomically, pretty-printed for diffs."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Save a training checkpoint (tensors, numbers, strings, lists, dicts) atomically."""
    buf = io.BytesIO()
    torch.save(state, buf)
    return atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | os.PathLike, kind: str | None = None) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` without unpickling arbitrary objects.

    ``kind`` names what the caller expects (for example ``"sac"``); a checkpoint of another kind is
    refused with a :class:`CheckpointError` rather than half-loaded.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"No checkpoint at {path}.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise CheckpointError(
            f"{path} is not a readable diffusion_rl checkpoint (truncated, corrupted, or written by "
            f"something else): {type(exc).__name__}. Delete it to start over, or point at another file."
        ) from None
    if not isinstance(state, dict) or "kind" not in state:
        raise CheckpointError(f"{path} is a torch file but not a diffusion_rl checkpoint (no 'kind' field).")
    if kind is not None and state["kind"] != kind:
        raise CheckpointError(f"{path} holds a '{state['kind']}' checkpoint, but a '{kind}' checkpoint was expected.")
    return state


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
