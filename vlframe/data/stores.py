"""Region and text stores: LMDB folders, one record per image / per text.

Region store (``RegionStoreWriter`` / ``RegionStore``)
    One LMDB record per image, key = image id (utf-8). The value is a msgpack map whose arrays are
    ``{"dtype", "shape", "data"}`` with the raw array bytes, so a read is one ``np.frombuffer``
    per array. Features are fp16 ``[K, D]``, boxes the 7-d UNITER position ``[K, 7]`` (computed
    once at write time by :func:`box7`), detector soft labels ``[K, C]`` (class 0 = background),
    confidences ``[K]``; regions are sorted by confidence, highest first. The reserved key
    ``\\x00meta`` holds the store's meta: feature dim, number of labels, format version, the image
    ids, and every image's sorted confidences, so the number of regions selected for any
    threshold is known without decoding features.

    Region selection follows the original UNITER code:
    ``K = min(max_regions, max(min_regions, #(conf > conf_threshold)))``, capped by the regions
    the image has; ``fixed_regions`` takes the top K instead; ``conf_threshold=None`` keeps every
    region up to ``max_regions``.

Text store (``TextStoreWriter`` / ``TextStore``)
    One LMDB record per text, key = text id: msgpack of the token ids (int32, no CLS/SEP), the
    image id, the raw text and a task-specific ``extra`` map. JSON side files ``meta.json``
    (tokenizer name, special ids, vocabulary size, count, version), ``id2len.json``,
    ``txt2img.json`` and ``img2txts.json`` sit in the same folder.

Readers open LMDB read-only, without locks or readahead, and lazily in each process: a store
pickles to its arguments, so DataLoader workers (fork or spawn) each open their own environment.

Read path (the loader's hot loop): one read transaction per record, msgpack decoded straight from
LMDB's memory map (``buffers=True``; msgpack copies each array's bytes once), arrays returned as
read-only ``np.frombuffer`` views of those bytes in their stored dtype (features fp16), and the
finiteness check done on the fp16/fp32 bit patterns (an exponent of all ones is NaN/inf), which is
~15x faster than ``np.isfinite`` on fp16. A record with NaN/inf raises :class:`DataQualityError`.
"""
from __future__ import annotations

import abc
import json
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from typing import Any

import lmdb
import msgpack
import numpy as np

from vlframe.io import atomic_write_json, fsync_dir

__all__ = [
    "DataQualityError",
    "all_finite",
    "box7",
    "select_num_regions",
    "RegionRecord",
    "RegionStoreWriter",
    "RegionStore",
    "TextRecord",
    "TextStoreWriter",
    "TextStore",
]

REGION_FORMAT = "vlframe-region-store"
TEXT_FORMAT = "vlframe-text-store"
FORMAT_VERSION = 1
_META_KEY = b"\x00meta"  # ids may not start with NUL, so this never collides with an image id
_BOX_TOL = 1e-2  # detectors' normalised boxes overshoot [0, 1] slightly; more than this is an error
_COMMIT_EVERY = 512  # records per write transaction


class DataQualityError(ValueError):
    """Data that breaks the data-quality rules (docs/data.md): an image without regions, an empty
    text, NaN/inf values. ``path`` is the store, ``key`` the image/text id, ``reason`` one of
    ``"zero_regions"``, ``"empty_text"``, ``"non_finite"``."""

    def __init__(self, message: str, *, path: str | None = None, key: str | None = None,
                 reason: str | None = None):
        # keyword fields are optional so a DataLoader worker's error re-raises as this type
        super().__init__(message)
        self.path, self.key, self.reason = path, key, reason

    def __reduce__(self):  # pickles with its fields
        return (_rebuild_quality_error, (str(self), self.path, self.key, self.reason))


def _rebuild_quality_error(message: str, path: str | None, key: str | None, reason: str | None) -> DataQualityError:
    return DataQualityError(message, path=path, key=key, reason=reason)


# ---------------------------------------------------------------------------------------------
# arrays <-> msgpack


def _pack_array(a: np.ndarray) -> dict[str, Any]:
    a = np.ascontiguousarray(a)
    return {"dtype": a.dtype.str, "shape": list(a.shape), "data": a.tobytes()}


def _unpack_array(d: Any, name: str) -> np.ndarray:
    if not isinstance(d, dict) or not {"dtype", "shape", "data"} <= d.keys():
        raise ValueError(f"field {name!r} is not an encoded array")
    try:
        dtype = np.dtype(d["dtype"])
        shape = tuple(int(s) for s in d["shape"])
        return np.frombuffer(d["data"], dtype=dtype).reshape(shape)
    except (TypeError, ValueError) as e:
        raise ValueError(f"field {name!r} cannot be decoded: {e}") from None


# |bits| >= the all-ones exponent <=> NaN or inf, per IEEE float width (sign bit masked off).
_NONFINITE_BITS = {
    np.dtype(np.float16): (np.uint16, 0x7FFF, 0x7C00),
    np.dtype(np.float32): (np.uint32, 0x7FFFFFFF, 0x7F800000),
}


def all_finite(a: np.ndarray) -> bool:
    """``np.isfinite(a).all()``, computed on the bit patterns for fp16/fp32: one integer max pass
    instead of numpy's slow fp16 ``isfinite`` (the check runs on every record read)."""
    if a.size == 0:
        return True
    bits = _NONFINITE_BITS.get(a.dtype)
    if bits is None or not a.flags.c_contiguous:
        return bool(np.isfinite(a).all())
    utype, mask, exp = bits
    return int(np.bitwise_and(a.reshape(-1).view(utype), mask).max()) < exp


def box7(boxes: np.ndarray) -> np.ndarray:
    """UNITER's 7-d region position: ``[K, 4]`` (x1, y1, x2, y2) or ``[K, 6]`` (+ w, h), normalised
    by the image size -> float32 ``[K, 7]`` = x1, y1, x2, y2, w, h, w*h.

    The one home of this feature: every store and importer goes through it.
    """
    b = np.asarray(boxes, dtype=np.float32)
    if b.ndim != 2 or b.shape[1] not in (4, 6):
        raise ValueError(f"box7: boxes must be [K, 4] or [K, 6], got shape {b.shape}")
    if b.shape[1] == 4:
        w = b[:, 2] - b[:, 0]
        h = b[:, 3] - b[:, 1]
    else:  # the original norm_bb already carries w, h; keep them as stored
        w, h = b[:, 4], b[:, 5]
    return np.concatenate([b[:, :4], w[:, None], h[:, None], (w * h)[:, None]], axis=1).astype(np.float32)


def select_num_regions(
    num_available: int,
    sorted_conf: np.ndarray | None,
    *,
    conf_threshold: float | None,
    min_regions: int,
    max_regions: int,
    fixed_regions: int | None,
) -> int:
    """Number of regions kept for one image (see the module docstring)."""
    if fixed_regions is not None:
        return min(fixed_regions, num_available)
    if conf_threshold is None or sorted_conf is None:
        return min(max_regions, num_available)
    # conf is sorted descending: count of conf > t via a search on the negated ascending copy
    above = int(np.searchsorted(-np.asarray(sorted_conf, dtype=np.float32), -conf_threshold, side="left"))
    return min(num_available, min(max_regions, max(min_regions, above)))


# ---------------------------------------------------------------------------------------------
# LMDB plumbing


_UMASK = os.umask(0)
os.umask(_UMASK)


def _check_target(path: str, overwrite: bool, what: str) -> None:
    if os.path.exists(path) and not overwrite and (not os.path.isdir(path) or os.listdir(path)):
        raise FileExistsError(f"{what} {path}: already exists (pass overwrite=True to replace it)")


def _swap_in(new_dir: str, path: str) -> None:
    """Put the finished store ``new_dir`` at ``path``; what was there is removed only after."""
    parent = os.path.dirname(os.path.abspath(path))
    old = None
    if os.path.lexists(path):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=parent)
        os.rmdir(old)
        os.replace(path, old)
    os.replace(new_dir, path)
    fsync_dir(parent)
    if old is not None:
        shutil.rmtree(old) if os.path.isdir(old) and not os.path.islink(old) else os.remove(old)


_ENVS: dict[str, lmdb.Environment] = {}  # realpath -> env; py-lmdb allows one env per path per process
_ENVS_PID = os.getpid()
_ENVS_LOCK = threading.Lock()


def _shared_env(path: str, what: str, key: str | None = None) -> lmdb.Environment:
    global _ENVS_PID
    key = key or os.path.realpath(path)
    with _ENVS_LOCK:
        if _ENVS_PID != os.getpid():
            # Environments inherited through fork must not be used (LMDB rule); open our own.
            _ENVS.clear()
            _ENVS_PID = os.getpid()
        env = _ENVS.get(key)
        if env is None:
            try:
                env = lmdb.open(path, readonly=True, lock=False, readahead=False, create=False,
                                subdir=True, max_readers=2048, meminit=False)
            except lmdb.Error as e:
                raise ValueError(f"{what} {path}: not an LMDB store ({e})") from None
            _ENVS[key] = env
        return env


def _evict_env(path: str) -> None:
    """Close this process's reader of ``path`` (before the folder is rewritten, or on close())."""
    with _ENVS_LOCK:
        env = _ENVS.pop(os.path.realpath(path), None) if _ENVS_PID == os.getpid() else None
    if env is not None:
        env.close()


class _UndecodableRecord(ValueError):
    """A value that is not msgpack; the store's reader re-raises it naming the store and id."""


class _LazyEnv:
    """Read-only LMDB access, opened on first use in each process and shared by all readers of
    the same folder in that process; pickles to its path (DataLoader workers reopen)."""

    def __init__(self, path: str, what: str):
        self.path = path
        self.what = what
        self._key: str | None = None  # realpath, resolved once: 4 lstat calls were a third of a read

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "what": self.what, "_key": None}

    @property
    def env(self) -> lmdb.Environment:
        # The env itself is not cached here: a forked worker must be able to drop the inherited
        # handles (py-lmdb refuses a second open of the same files while one is alive).
        if self._key is None:
            self._key = os.path.realpath(self.path)
        return _shared_env(self.path, self.what, self._key)

    def get(self, key: bytes) -> bytes | None:
        with self.env.begin(buffers=False) as txn:
            return txn.get(key)

    def unpack(self, key: bytes) -> Any:
        """msgpack-decode the value of ``key`` straight from the memory map (no copy of the whole
        value first; the buffer is only valid inside the transaction, and msgpack copies what it
        keeps). ``None`` when the key is absent; :class:`_UndecodableRecord` when not msgpack."""
        env = self.env  # an error opening the store propagates as it is
        with env.begin(buffers=True) as txn:
            buf = txn.get(key)
            if buf is None:
                return None
            try:
                return msgpack.unpackb(buf, raw=False)
            except (ValueError, msgpack.UnpackException) as e:
                raise _UndecodableRecord(str(e) or type(e).__name__) from None

    def close(self) -> None:
        _evict_env(self.path)


class _Writer(abc.ABC):
    """Shared LMDB writing: batched transactions, duplicate ids, abort on error."""

    what = "store"

    def __init__(self, path: str, *, overwrite: bool, map_size: int):
        self.path = os.fspath(path)
        _check_target(self.path, overwrite, self.what)
        # Written aside and swapped in by close(): a failed write (or overwrite) leaves what was at
        # ``path`` intact.
        parent = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(parent, exist_ok=True)
        self._dir = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(self.path))}.writing-", dir=parent)
        os.chmod(self._dir, 0o777 & ~_UMASK)  # mkdtemp makes it private; the store gets the usual mode
        self._env = lmdb.open(self._dir, map_size=map_size, subdir=True, readahead=False, meminit=False)
        self._txn = self._env.begin(write=True)
        self._pending = 0
        self._ids: list[str] = []
        self._seen: set[str] = set()
        self._closed = False

    def _check_id(self, key: str, kind: str) -> bytes:
        if self._closed:
            raise ValueError(f"{self.what} {self.path}: writer is closed")
        if not isinstance(key, str) or not key or key.startswith("\x00"):
            raise ValueError(f"{self.what} {self.path}: {kind} {key!r} must be a non-empty string not starting with NUL")
        if key in self._seen:
            raise ValueError(f"{self.what} {self.path}: duplicate {kind} {key!r}")
        return key.encode("utf-8")

    def _put(self, key: str, kbytes: bytes, value: dict[str, Any]) -> None:
        self._txn.put(kbytes, msgpack.packb(value, use_bin_type=True))
        self._seen.add(key)
        self._ids.append(key)
        self._pending += 1
        if self._pending >= _COMMIT_EVERY:
            self._txn.commit()
            self._txn = self._env.begin(write=True)
            self._pending = 0

    def _finish(self, meta_value: bytes | None) -> None:
        if meta_value is not None:
            self._txn.put(_META_KEY, meta_value)
        self._txn.commit()
        self._env.sync()
        self._env.close()
        self._closed = True

    def _publish(self) -> None:
        """The last step of close(): the finished folder takes the store's name."""
        _evict_env(self.path)
        _swap_in(self._dir, self.path)

    def _abort(self) -> None:
        # No meta record is written, so a half-written store is never mistaken for a good one.
        if not self._closed:
            self._txn.abort()
            self._env.close()
            self._closed = True
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._abort()

    @abc.abstractmethod
    def close(self) -> None:
        """Write the store's meta and close it."""


# ---------------------------------------------------------------------------------------------
# region store


@dataclass
class RegionRecord:
    img_id: str
    features: np.ndarray  # fp16 [K, D]
    boxes: np.ndarray  # float32 [K, 7]
    soft_labels: np.ndarray | None  # fp16/fp32 [K, C], background at index 0
    conf: np.ndarray  # float32 [K]
    width: int = 0  # 0 when unknown
    height: int = 0

    @property
    def num_regions(self) -> int:
        return int(self.features.shape[0])


def _as_float(x: Any, name: str, err) -> np.ndarray:
    try:
        a = np.asarray(x)
        if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer) or a.dtype == bool):
            raise TypeError(a.dtype)
        return a
    except (TypeError, ValueError) as e:
        raise err(f"{name} is not a numeric array ({e})") from None


class RegionStoreWriter(_Writer):
    """Write one record per image; ``close()`` (or leaving the ``with`` block) writes the meta."""

    what = "region store"

    def __init__(self, path, *, feat_dim: int, num_labels: int | None, overwrite: bool = False,
                 map_size: int = 1 << 40):
        if int(feat_dim) < 1:
            raise ValueError(f"region store {path}: feat_dim must be >= 1, got {feat_dim}")
        if num_labels is not None and int(num_labels) < 2:
            raise ValueError(f"region store {path}: num_labels must be >= 2 (background + classes), got {num_labels}")
        self.feat_dim = int(feat_dim)
        self.num_labels = None if num_labels is None else int(num_labels)
        super().__init__(path, overwrite=overwrite, map_size=map_size)
        self._nreg: list[int] = []
        self._confs: list[np.ndarray] = []

    def add(self, img_id: str, *, features, boxes, soft_labels=None, conf=None, width: int = 0,
            height: int = 0) -> None:
        """Add one image. ``conf`` defaults to ``1 - soft_labels[:, 0]`` (the detector's
        non-background probability), or to 1 without soft labels. Regions are stored sorted by
        ``conf``, highest first."""
        key = self._check_id(img_id, "img_id")

        def err(msg: str) -> ValueError:
            return ValueError(f"region store {self.path}: img_id {img_id!r}: {msg}")

        feats = _as_float(features, "features", err)
        if feats.ndim != 2:
            raise err(f"features must be [K, D], got shape {feats.shape}")
        k = feats.shape[0]
        if k < 1:
            raise err("no regions (K = 0)")
        if feats.shape[1] != self.feat_dim:
            raise err(f"features have dim {feats.shape[1]}, the store's feat_dim is {self.feat_dim}")
        feats16 = feats.astype(np.float16)
        if not np.isfinite(feats16).all():
            raise err("features contain NaN/inf (or values beyond fp16 range)")

        b = _as_float(boxes, "boxes", err).astype(np.float32)
        if b.ndim != 2 or b.shape[1] not in (4, 6) or b.shape[0] != k:
            raise err(f"boxes must be [K={k}, 4] or [K={k}, 6], got shape {b.shape}")
        if not np.isfinite(b).all():
            raise err("boxes contain NaN/inf")
        if b[:, :4].min() < -_BOX_TOL or b[:, :4].max() > 1 + _BOX_TOL:
            raise err(f"boxes must be normalised to [0, 1], got range [{b[:, :4].min():.4g}, {b[:, :4].max():.4g}]")
        if (b[:, 2] < b[:, 0] - _BOX_TOL).any() or (b[:, 3] < b[:, 1] - _BOX_TOL).any():
            raise err("boxes must have x2 >= x1 and y2 >= y1")
        pos = box7(b)

        soft = None
        if soft_labels is not None:
            if self.num_labels is None:
                raise err("soft_labels given but the store was opened with num_labels=None")
            soft = _as_float(soft_labels, "soft_labels", err)
            if soft.ndim != 2 or soft.shape != (k, self.num_labels):
                raise err(f"soft_labels must be [K={k}, C={self.num_labels}], got shape {soft.shape}")
            if conf is None:  # from the given precision, before fp16 storage
                conf = 1.0 - soft[:, 0].astype(np.float32)
            soft = soft.astype(np.float32 if soft.dtype == np.float32 else np.float16)
            if not np.isfinite(soft).all():
                raise err("soft_labels contain NaN/inf")
        elif self.num_labels is not None:
            raise err(f"soft_labels missing; the store holds num_labels={self.num_labels}")

        if conf is None:
            # Without explicit scores or soft labels every region counts as confident.
            c = np.ones(k, np.float32)
        else:
            c = _as_float(conf, "conf", err).astype(np.float32).reshape(-1)
            if c.shape[0] != k:
                raise err(f"conf must have K={k} values, got {c.shape[0]}")
            if not np.isfinite(c).all():
                raise err("conf contains NaN/inf")
        if int(width) < 0 or int(height) < 0:
            raise err(f"width/height must be >= 0, got {width}x{height}")

        order = np.argsort(-c, kind="stable")
        value = {
            "features": _pack_array(feats16[order]),
            "boxes": _pack_array(pos[order]),
            "conf": _pack_array(c[order]),
            "soft_labels": None if soft is None else _pack_array(soft[order]),
            "width": int(width),
            "height": int(height),
        }
        self._put(img_id, key, value)
        self._nreg.append(k)
        self._confs.append(c[order])

    def close(self) -> None:
        if self._closed:
            return
        meta = {
            "format": REGION_FORMAT,
            "version": FORMAT_VERSION,
            "feat_dim": self.feat_dim,
            "num_labels": self.num_labels,
            "count": len(self._ids),
            "ids": self._ids,
            "num_regions": _pack_array(np.asarray(self._nreg, dtype=np.int32)),
            "conf": _pack_array(np.concatenate(self._confs) if self._confs else np.zeros(0, np.float32)),
        }
        self._finish(msgpack.packb(meta, use_bin_type=True))
        self._publish()


class RegionStore:
    """Read-only access to a region store with UNITER's per-image region selection."""

    def __init__(self, path, *, conf_threshold: float | None = 0.2, min_regions: int = 10,
                 max_regions: int = 100, fixed_regions: int | None = None,
                 expect_feat_dim: int | None = None):
        self.path = os.fspath(path)
        if not os.path.isdir(self.path):
            raise FileNotFoundError(f"region store {self.path}: folder not found")
        if min_regions < 0 or max_regions < 1 or min_regions > max_regions:
            raise ValueError(f"region store {self.path}: need 0 <= min_regions <= max_regions and max_regions >= 1, "
                             f"got min_regions={min_regions}, max_regions={max_regions}")
        if fixed_regions is not None and fixed_regions < 1:
            raise ValueError(f"region store {self.path}: fixed_regions must be >= 1, got {fixed_regions}")
        self.conf_threshold = conf_threshold
        self.min_regions = int(min_regions)
        self.max_regions = int(max_regions)
        self.fixed_regions = fixed_regions
        self.expect_feat_dim = expect_feat_dim
        self._env = _LazyEnv(self.path, "region store")
        if not os.path.exists(os.path.join(self.path, "data.mdb")):
            raise ValueError(f"region store {self.path}: not a region store (no data.mdb)")
        raw = self._env.get(_META_KEY)
        if raw is None:
            raise ValueError(f"region store {self.path}: not a region store (no meta record; incomplete write?)")
        try:
            meta = msgpack.unpackb(raw, raw=False)
            if meta.get("format") != REGION_FORMAT:
                raise ValueError(f"format {meta.get('format')!r}")
            nreg = _unpack_array(meta["num_regions"], "num_regions").astype(np.int64)
            confs = _unpack_array(meta["conf"], "conf")
            ids = list(meta["ids"])
        except (ValueError, KeyError, TypeError, msgpack.UnpackException) as e:
            raise ValueError(f"region store {self.path}: not a region store (bad meta: {e})") from None
        if meta["version"] > FORMAT_VERSION:
            raise ValueError(f"region store {self.path}: format version {meta['version']} is newer than "
                             f"this code reads ({FORMAT_VERSION})")
        self.feat_dim: int = int(meta["feat_dim"])
        self.num_labels: int | None = meta["num_labels"]
        if expect_feat_dim is not None and int(expect_feat_dim) != self.feat_dim:
            raise ValueError(f"region store {self.path}: features have dim {self.feat_dim} but {expect_feat_dim} "
                             f"is expected (the store was written with another feature dimension than the config says)")
        if len(ids) != len(nreg) or int(nreg.sum()) != len(confs):
            raise ValueError(f"region store {self.path}: not a region store (inconsistent meta)")
        self._ids = ids
        offsets = np.concatenate([[0], np.cumsum(nreg)])
        self._index = {img_id: i for i, img_id in enumerate(ids)}
        # selected K per image, computed once from the stored confidences
        self._selected = np.array([
            select_num_regions(int(nreg[i]), confs[offsets[i]:offsets[i + 1]], conf_threshold=conf_threshold,
                               min_regions=self.min_regions, max_regions=self.max_regions,
                               fixed_regions=fixed_regions)
            for i in range(len(ids))
        ], dtype=np.int64)
        self._available = nreg

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, img_id: object) -> bool:
        return img_id in self._index

    def ids(self) -> list[str]:
        return list(self._ids)

    def _pos(self, img_id: str) -> int:
        try:
            return self._index[img_id]
        except (KeyError, TypeError):
            raise KeyError(f"region store {self.path}: unknown img_id {img_id!r}") from None

    def num_regions(self, img_id: str) -> int:
        """Regions :meth:`get` returns for ``img_id`` (from the meta; no feature decode)."""
        return int(self._selected[self._pos(img_id)])

    def num_stored(self, img_id: str) -> int:
        """Regions the record of ``img_id`` holds, before selection."""
        return int(self._available[self._pos(img_id)])

    def num_regions_array(self, img_ids: list[str] | None = None) -> np.ndarray:
        """Selected K for many images at once (all images in store order by default)."""
        if img_ids is None:
            return self._selected.copy()
        return np.array([self._selected[self._pos(i)] for i in img_ids], dtype=np.int64)

    def get(self, img_id: str, *, soft_labels: bool = True, check_soft_labels: bool = True) -> RegionRecord:
        """The selected regions of ``img_id`` as read-only views of the record (fp16 features as
        stored; copy before modifying). ``soft_labels=False`` skips decoding and checking them
        (``[K, C]``, with C = 1601 bigger than the features; only MRC tasks use them).
        ``check_soft_labels=False`` decodes them without the NaN/inf check, for a caller that checks
        the rows it uses (the dataset: :mod:`vlframe.data.batch` checks what a batch copies)."""
        i = self._pos(img_id)

        def err(msg: str) -> ValueError:
            return ValueError(f"region store {self.path}: img_id {img_id!r}: corrupt record: {msg}")

        try:
            rec = self._env.unpack(img_id.encode("utf-8"))
        except _UndecodableRecord as e:
            raise err(str(e)) from None
        if rec is None:
            raise err("listed in the meta but missing from the database")
        try:
            feats = _unpack_array(rec["features"], "features")
            boxes = _unpack_array(rec["boxes"], "boxes")
            conf = _unpack_array(rec["conf"], "conf")
            soft = None
            if soft_labels and rec.get("soft_labels") is not None:
                soft = _unpack_array(rec["soft_labels"], "soft_labels")
            width, height = int(rec.get("width", 0)), int(rec.get("height", 0))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise err(str(e) or type(e).__name__) from None
        n = int(self._available[i])
        if feats.dtype != np.float16 or feats.shape != (n, self.feat_dim):
            raise err(f"features {feats.dtype} {feats.shape}, expected float16 ({n}, {self.feat_dim})")
        if boxes.dtype != np.float32 or boxes.shape != (n, 7):
            raise err(f"boxes {boxes.dtype} {boxes.shape}, expected float32 ({n}, 7)")
        if conf.dtype != np.float32 or conf.shape != (n,):
            raise err(f"conf {conf.dtype} {conf.shape}, expected float32 ({n},)")
        if soft is not None and (soft.dtype not in (np.float16, np.float32) or soft.shape != (n, self.num_labels)):
            raise err(f"soft_labels {soft.dtype} {soft.shape}, expected float16/32 ({n}, {self.num_labels})")
        k = int(self._selected[i])
        feats, boxes, conf = feats[:k], boxes[:k], conf[:k]
        soft = None if soft is None else soft[:k]
        checked = (("features", feats), ("boxes", boxes), ("conf", conf),
                   ("soft_labels", soft if check_soft_labels else None))
        bad = [name for name, a in checked if a is not None and not all_finite(a)]
        if bad:
            raise DataQualityError(
                f"region store {self.path}: img_id {img_id!r}: non-finite values (NaN/inf) in {', '.join(bad)} "
                f"(a store written outside vlframe or damaged; rewrite it, the writers and importers reject these)",
                path=self.path, key=img_id, reason="non_finite")
        return RegionRecord(img_id=img_id, features=feats, boxes=boxes, soft_labels=soft, conf=conf,
                            width=width, height=height)

    def close(self) -> None:
        self._env.close()

    def __repr__(self) -> str:
        return (f"RegionStore({self.path!r}, images={len(self)}, feat_dim={self.feat_dim}, "
                f"num_labels={self.num_labels})")


# ---------------------------------------------------------------------------------------------
# text store

_SPECIAL_KEYS = ("cls", "sep", "mask", "pad", "unk")


@dataclass
class TextRecord:
    txt_id: str
    token_ids: np.ndarray  # int32, without CLS/SEP
    img_id: str | None = None
    raw: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class TextStoreWriter(_Writer):
    """Write tokenised texts; ``close()`` writes meta.json, id2len.json, txt2img.json, img2txts.json."""

    what = "text store"

    def __init__(self, path, *, tokenizer_name: str, special_ids: dict, vocab_size: int,
                 overwrite: bool = False, map_size: int = 1 << 38):
        missing = [k for k in _SPECIAL_KEYS if k not in special_ids]
        if missing:
            raise ValueError(f"text store {path}: special_ids lacks {missing} (needs {list(_SPECIAL_KEYS)})")
        bad = {k: v for k, v in special_ids.items() if not 0 <= int(v) < int(vocab_size)}
        if bad:
            raise ValueError(f"text store {path}: special ids {bad} outside the vocabulary [0, {vocab_size})")
        self.tokenizer_name = str(tokenizer_name)
        self.special_ids = {k: int(v) for k, v in special_ids.items()}
        self.vocab_size = int(vocab_size)
        super().__init__(path, overwrite=overwrite, map_size=map_size)
        self._id2len: dict[str, int] = {}
        self._txt2img: dict[str, str] = {}
        self._img2txts: dict[str, list[str]] = {}

    def add(self, txt_id: str, *, token_ids, img_id: str | None = None, raw: str | None = None,
            extra: dict | None = None) -> None:
        key = self._check_id(txt_id, "txt_id")

        def err(msg: str) -> ValueError:
            return ValueError(f"text store {self.path}: txt_id {txt_id!r}: {msg}")

        ids = np.asarray(token_ids)
        if ids.ndim != 1:
            raise err(f"token_ids must be 1-d, got shape {ids.shape}")
        if ids.size == 0:
            raise err("empty text (no tokens)")
        if not np.issubdtype(ids.dtype, np.integer):
            raise err(f"token_ids must be integers, got {ids.dtype}")
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.vocab_size:
            raise err(f"token id {lo if lo < 0 else hi} outside the vocabulary [0, {self.vocab_size})")
        if img_id is not None and not isinstance(img_id, str):
            raise err(f"img_id must be a string or None, got {type(img_id).__name__}")
        if extra is not None and not isinstance(extra, dict):
            raise err(f"extra must be a dict, got {type(extra).__name__}")
        value = {"ids": _pack_array(ids.astype(np.int32)), "img": img_id, "raw": raw, "extra": extra or {}}
        try:
            self._put(txt_id, key, value)
        except TypeError as e:
            raise err(f"extra is not msgpack-serialisable ({e})") from None
        self._id2len[txt_id] = int(ids.size)
        if img_id is not None:
            self._txt2img[txt_id] = img_id
            self._img2txts.setdefault(img_id, []).append(txt_id)

    def close(self) -> None:
        if self._closed:
            return
        self._finish(None)
        atomic_write_json(os.path.join(self._dir, "id2len.json"), self._id2len, ensure_ascii=False)
        atomic_write_json(os.path.join(self._dir, "txt2img.json"), self._txt2img, ensure_ascii=False)
        atomic_write_json(os.path.join(self._dir, "img2txts.json"), self._img2txts, ensure_ascii=False)
        # meta last: its presence marks a complete store
        atomic_write_json(os.path.join(self._dir, "meta.json"), {
            "format": TEXT_FORMAT,
            "version": FORMAT_VERSION,
            "tokenizer_name": self.tokenizer_name,
            "special_ids": self.special_ids,
            "vocab_size": self.vocab_size,
            "count": len(self._ids),
            "ids": self._ids,
        }, ensure_ascii=False)
        self._publish()


class TextStore:
    """Read-only access to a text store."""

    def __init__(self, path):
        self.path = os.fspath(path)
        if not os.path.isdir(self.path):
            raise FileNotFoundError(f"text store {self.path}: folder not found")
        meta_path = os.path.join(self.path, "meta.json")
        if not os.path.isfile(meta_path) or not os.path.exists(os.path.join(self.path, "data.mdb")):
            raise ValueError(f"text store {self.path}: not a text store (no meta.json/data.mdb; incomplete write?)")

        def load(name: str) -> Any:
            p = os.path.join(self.path, name)
            try:
                with open(p, encoding="utf-8") as f:
                    return json.load(f)
            except (OSError, json.JSONDecodeError) as e:
                raise ValueError(f"text store {self.path}: cannot read {name}: {e}") from None

        meta = load("meta.json")
        if not isinstance(meta, dict) or meta.get("format") != TEXT_FORMAT:
            raise ValueError(f"text store {self.path}: not a text store (meta.json format {meta.get('format')!r})")
        if meta["version"] > FORMAT_VERSION:
            raise ValueError(f"text store {self.path}: format version {meta['version']} is newer than "
                             f"this code reads ({FORMAT_VERSION})")
        self._ids: list[str] = list(meta.pop("ids"))
        self.meta: dict[str, Any] = meta
        self.id2len: dict[str, int] = load("id2len.json")
        self.txt2img: dict[str, str] = load("txt2img.json")
        self.img2txts: dict[str, list[str]] = load("img2txts.json")
        self._env = _LazyEnv(self.path, "text store")

    @property
    def special_ids(self) -> dict[str, int]:
        return dict(self.meta["special_ids"])

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    def ids(self) -> list[str]:
        return list(self._ids)

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, txt_id: object) -> bool:
        return txt_id in self.id2len

    def get(self, txt_id: str) -> TextRecord:
        if txt_id not in self.id2len:
            raise KeyError(f"text store {self.path}: unknown txt_id {txt_id!r}")

        def err(msg: str) -> ValueError:
            return ValueError(f"text store {self.path}: txt_id {txt_id!r}: corrupt record: {msg}")

        try:
            rec = self._env.unpack(txt_id.encode("utf-8"))
        except _UndecodableRecord as e:
            raise err(str(e)) from None
        if rec is None:
            raise err("listed in id2len but missing from the database")
        try:
            ids = _unpack_array(rec["ids"], "ids")
            img_id, text, extra = rec.get("img"), rec.get("raw"), rec.get("extra") or {}
        except (ValueError, KeyError, TypeError, AttributeError, msgpack.UnpackException) as e:
            raise err(str(e) or type(e).__name__) from None
        if ids.dtype != np.int32 or ids.ndim != 1 or ids.size != self.id2len[txt_id]:
            raise err(f"token ids {ids.dtype} {ids.shape}, expected int32 ({self.id2len[txt_id]},)")
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise err(f"token ids outside the vocabulary [0, {self.vocab_size})")
        return TextRecord(txt_id=txt_id, token_ids=ids, img_id=img_id, raw=text, extra=extra)

    def close(self) -> None:
        self._env.close()

    def __repr__(self) -> str:
        return f"TextStore({self.path!r}, texts={len(self)}, tokenizer={self.meta.get('tokenizer_name')!r})"
