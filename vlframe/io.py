"""File writing that never leaves a half-written file under the final name."""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from typing import IO, Any

TMP_SUFFIX = ".tmp"


def temp_prefix(path: str | os.PathLike) -> str:
    """Name prefix of :func:`atomic_write`'s temp files for ``path`` (so a later start can find
    the ones an interrupted save left behind)."""
    return f".{os.path.basename(os.fspath(path))}."


def fsync_dir(folder: str) -> None:
    """Make a folder's entries (a new or renamed file) durable; a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a folder
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[IO], None], *, binary: bool = True) -> None:
    """Call ``write(f)`` on a temp file beside ``path``, fsync it and the folder, rename it onto
    ``path``, fsync the folder again.

    An interruption (crash, kill, full disk) leaves the previous ``path`` intact; an exception
    leaves no temp file (a kill can: :func:`vlframe.engine.checkpoint.remove_orphans` clears them).
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=TMP_SUFFIX, dir=folder)
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(folder)  # the temp file's data and entry are on disk before it takes the name
        os.replace(tmp, path)
        fsync_dir(folder)  # and the rename itself survives a power loss
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any, **dump_kwargs: Any) -> None:
    """``obj`` as JSON at ``path``, written through :func:`atomic_write`."""
    atomic_write(path, lambda f: json.dump(obj, f, **dump_kwargs), binary=False)
