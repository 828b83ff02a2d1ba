"""Atomic file writes: write to a temporary file in the destination folder, then rename over the target.

An interrupted write (crash, Ctrl-C, full disk) never leaves a truncated file under the final name, and
the previous file, if any, stays intact until the new one is complete.
"""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

FILE_MODE = 0o644  # mkstemp creates 0600; finished files get the usual permissions


def unwritable_reason(path: str | os.PathLike) -> str | None:
    """Why path cannot be written as a file, checked before anything is written: a folder on its way is a file,
    or path itself is a folder; None when it can be (missing folders are created)."""
    path = Path(path)
    blocking = next((folder for folder in path.parents if folder.exists() and not folder.is_dir()), None)
    if blocking is not None:
        return f"cannot write {path}: {blocking} is a file, not a folder"
    if path.is_dir():
        return f"cannot write {path}: it is a folder; name a file"
    return None


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary sibling of path for writing; on success rename it to path, on failure remove it.

    Args:
        path: the destination; parent folders are created.
        mode: "wb" or "w".
    Raises:
        ValueError: `unwritable_reason` has one.
    """
    path = Path(path)
    reason = unwritable_reason(path)
    if reason is not None:
        raise ValueError(reason)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    """Write a small text file through a temporary file renamed over path."""
    with atomic_write(path, "w") as handle:
        handle.write(text)
