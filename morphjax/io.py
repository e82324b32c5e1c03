"""Atomic file writes: an interrupted run leaves either the old file or the new one, never half of one.

The data goes to a temporary file in the destination directory (same filesystem, so the final
`os.replace` is atomic), is fsynced, and is then renamed over the destination.
"""

import contextlib
import io
import json
import os
import secrets
from typing import Any

import numpy as np


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes `data` to `path` atomically, creating parent directories."""
    path = os.path.abspath(os.fspath(path))
    directory, name = os.path.split(path)
    os.makedirs(directory, exist_ok=True)
    tmp_path = os.path.join(directory, f".{name}.{secrets.token_hex(6)}.tmp")
    # os.open with 0o666 respects the umask, unlike tempfile.mkstemp (always 0o600).
    fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise
    _fsync_directory(directory)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes `text` to `path` as UTF-8, atomically, creating parent directories."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> None:
    """Writes `obj` as JSON to `path` atomically.

    NumPy and JAX scalars/arrays are converted to Python numbers/lists. NaN and infinity are
    refused because they are not valid JSON and other readers (jq, JavaScript) reject them.
    """
    try:
        text = json.dumps(obj, indent=indent, allow_nan=False, default=_to_builtin)
    except ValueError as e:
        raise ValueError(
            f"Cannot write {os.fspath(path)}: {e}. Replace NaN/inf values (e.g. with None) first."
        ) from e
    atomic_write_text(path, text + "\n")


def atomic_write_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """Writes `array` in .npy format to `path` atomically."""
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array), allow_pickle=False)
    atomic_write_bytes(path, buffer.getvalue())


def _to_builtin(value: Any) -> Any:
    """json.dumps fallback for NumPy/JAX values."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray) or hasattr(value, "__array__"):
        return np.asarray(value).tolist()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _fsync_directory(directory: str) -> None:
    """Makes the rename itself durable; not every platform can open a directory."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)
