"""The one home of file access: paths go through iopath's ``PathManager``; writes are atomic.

Reading: ``open_path`` / ``local_path`` / ``exists`` / ``isfile`` / ``isdir`` accept local paths
and any URI a registered handler serves (``http://`` and ``https://`` out of the box, through
iopath's ``HTTPURLHandler``, which downloads once into ``cache_dir()``). A user registers more
(e.g. an S3 handler) with ``path_manager().register_handler(...)``. iopath's HTTP handler keeps
a downloaded file for good (keyed by the URL's path): a changed remote file needs a new URL or
clearing ``cache_dir()``.

Writing: ``atomic_write`` writes a temp file beside the final path, fsyncs and renames it. For a
destination that is not a local path, the file is written locally first (same guarantees), then
copied through the path manager.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from typing import IO, Any

from iopath.common.file_io import HTTPURLHandler, PathManager

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

__all__ = ["TMP_SUFFIX", "atomic_write", "atomic_write_json", "cache_dir", "fsync_dir", "is_local", "isdir", "isfile",
           "local_path", "open_path", "path_manager", "temp_prefix"]

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
    """Open ``path`` for reading (a remote one from its local copy; ``encoding="utf-8"`` by
    default in text mode)."""
    if any(c in mode for c in "wax+"):
        raise ValueError(f"open_path reads only (mode {mode!r}); write with atomic_write")
    if "b" not in mode:
        kwargs.setdefault("encoding", "utf-8")
    return open(local_path(path), mode, **kwargs)


def isfile(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a file. For a handler that cannot tell (HTTP), whether it downloads."""
    if is_local(path):
        return os.path.isfile(local_path(path))
    try:
        return bool(path_manager().isfile(os.fspath(path)))
    except NotImplementedError:
        try:
            return os.path.isfile(local_path(path))
        except FileNotFoundError:
            return False


def isdir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder (False where the handler has no folders, e.g. HTTP)."""
    if is_local(path):
        return os.path.isdir(local_path(path))
    try:
        return bool(path_manager().isdir(os.fspath(path)))
    except NotImplementedError:
        return False


def atomic_write(path: str | os.PathLike, write: Callable[[IO], None], *, binary: bool = True) -> None:
    """Call ``write(f)`` on a temp file beside ``path``, fsync it and the folder, rename it onto
    ``path``, fsync the folder again.

    An interruption (crash, kill, full disk) leaves the previous ``path`` intact; an exception
    leaves no temp file (a kill can: :func:`vlframe.engine.checkpoint.remove_orphans` clears them).
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
