"""The one home of file access: paths go through iopath's ``PathManager``; writes are atomic.

Reading: ``open_path`` / ``local_path`` / ``exists`` / ``isfile`` / ``isdir`` accept local paths
and any URI a registered handler serves (``http://`` and ``https://`` out of the box, through
iopath's ``HTTPURLHandler``, which downloads once into ``cache_dir()``). A user registers more
(e.g. an S3 handler) with ``path_manager().register_handler(...)``.

Writing: ``atomic_write`` writes a temp file beside the final path, fsyncs and renames it. For a
destination that is not a local path, the file is written locally first (same guarantees), then
copied through the path manager.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import IO

from iopath.common.file_io import HTTPURLHandler, PathManager

__all__ = ["atomic_write", "cache_dir", "exists", "is_local", "isdir", "isfile", "local_path", "open_path", "path_manager"]

_PM: PathManager | None = None


def cache_dir() -> str:
    """Where remote files are downloaded to: ``$VLFRAME_CACHE/remote``, default
    ``~/.cache/vlframe/remote``."""
    root = os.environ.get("VLFRAME_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "vlframe")
    return os.path.join(root, "remote")


def path_manager() -> PathManager:
    """The process-wide ``PathManager`` (HTTP(S) registered); register more handlers on it."""
    global _PM
    if _PM is None:
        pm = PathManager()
        pm.register_handler(HTTPURLHandler())
        _PM = pm
    return _PM


def is_local(path: str | os.PathLike) -> bool:
    """True for a plain file-system path (no ``scheme://`` a handler would serve)."""
    path = os.fspath(path)
    return "://" not in path or path.startswith("file://")


def local_path(path: str | os.PathLike) -> str:
    """A local file-system path for ``path``: itself if local, else a downloaded copy (cached)."""
    path = os.fspath(path)
    if is_local(path):
        return path[len("file://") :] if path.startswith("file://") else path
    try:
        return path_manager().get_local_path(path, cache_dir=cache_dir())
    except Exception as e:  # noqa: BLE001 - handlers raise many types; name the path
        raise FileNotFoundError(f"cannot fetch {path}: {type(e).__name__}: {e}") from e


def open_path(path: str | os.PathLike, mode: str = "r", **kwargs) -> IO:
    """``open`` through the path manager (``encoding="utf-8"`` by default in text mode)."""
    if "b" not in mode:
        kwargs.setdefault("encoding", "utf-8")
    return path_manager().open(os.fspath(path), mode, **kwargs)


def exists(path: str | os.PathLike) -> bool:
    return os.path.exists(path) if is_local(path) else bool(path_manager().exists(os.fspath(path)))


def isfile(path: str | os.PathLike) -> bool:
    return os.path.isfile(path) if is_local(path) else bool(path_manager().isfile(os.fspath(path)))


def isdir(path: str | os.PathLike) -> bool:
    return os.path.isdir(path) if is_local(path) else bool(path_manager().isdir(os.fspath(path)))


def atomic_write(path: str | os.PathLike, write: Callable[[IO], None], *, binary: bool = True) -> None:
    """Call ``write(f)`` on a temp file beside ``path``, fsync it, then rename it onto ``path``.

    An interruption (crash, kill, full disk) leaves the previous ``path`` intact and no temp file.
    A remote ``path`` is written to a local temp folder the same way, then copied through the
    path manager.
    """
    path = os.fspath(path)
    if not is_local(path):
        with tempfile.TemporaryDirectory(prefix="vlframe-upload-") as tmp_dir:
            tmp = os.path.join(tmp_dir, os.path.basename(path) or "file")
            atomic_write(tmp, write, binary=binary)
            path_manager().copy_from_local(tmp, path, overwrite=True)
        return
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise

