"""Region features from public dumps -> vlframe region store.

Formats read:

- bottom-up-attention TSV (Anderson et al.): one image per line, tab-separated, no header;
  arrays are base64 of little-endian float32 (ids: int64). Known column layouts are detected by
  their count (:data:`TSV_LAYOUTS`) or given with ``fields``.
- UNITER ``img_db``: LMDB, key = image file name, value = msgpack (msgpack-numpy encoding) of
  ``{features, norm_bb, conf, soft_labels}`` in fp16, or ``np.savez_compressed`` bytes of the same
  dict (the ``_compressed`` variant, detected per value); ``__keys__`` holds the JSON key list.
- UNITER per-image ``npz`` dumps: a folder of ``<name>.npz`` with the same four arrays.

Image ids: the TSV ``image_id`` column as text; the LMDB key / npz file name as it is (the
original txt_db refers to images by that name).
"""
from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import csv
import io
import json
import os
import re
import sys
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from vlframe.data.importers.common import (DataFormatError, ImportReport, add_common_args, check_array,
                                          unpack_msgpack_map)

# Column layouts of the public dumps, by column count.
TSV_LAYOUTS: dict[int, tuple[str, ...]] = {
    # generate_tsv.py of bottom-up-attention
    6: ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features"),
    # the same plus the detector's class distribution
    7: ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features", "cls_prob"),
    # the LXMERT-style dump with object and attribute predictions (note: height before width)
    10: ("img_id", "img_h", "img_w", "objects_id", "objects_conf", "attrs_id", "attrs_conf",
         "num_boxes", "boxes", "features"),
    11: ("img_id", "img_h", "img_w", "objects_id", "objects_conf", "attrs_id", "attrs_conf",
         "num_boxes", "boxes", "features", "cls_prob"),
}
_ALIASES = {"img_id": "image_id", "img_w": "image_w", "img_h": "image_h"}
# Array columns: dtype and the per-box width (None = inferred from the byte count).
_ARRAYS: dict[str, tuple[type, int | None]] = {
    "boxes": (np.float32, 4),
    "features": (np.float32, None),
    "cls_prob": (np.float32, None),
    "objects_id": (np.int64, 1),
    "objects_conf": (np.float32, 1),
    "attrs_id": (np.int64, 1),
    "attrs_conf": (np.float32, 1),
}
_REQUIRED = ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features")
UNITER_FIELDS = ("features", "norm_bb", "conf", "soft_labels")


@dataclass
class RegionInput:
    """One image as read from a dump, before it goes to the store."""

    img_id: str
    features: np.ndarray  # [K, D]
    boxes: np.ndarray  # [K, 4] or [K, 6], normalised
    soft_labels: np.ndarray | None  # [K, C]
    conf: np.ndarray | None  # [K]
    width: int = 0
    height: int = 0
    source: str = ""  # file and place it came from, for the store's refusals
    where: str = ""


def _set_csv_limit() -> None:
    # One feature column is ~100 boxes * 2048 * 4 bytes in base64: far past csv's 128 KiB default.
    limit = sys.maxsize
    while True:
        try:
            csv.field_size_limit(limit)
            return
        except OverflowError:  # C long is 32-bit on some platforms
            limit //= 2


def parse_fields(fields: str | Sequence[str] | None) -> tuple[str, ...] | None:
    if fields is None:
        return None
    names = [f.strip() for f in fields.split(",")] if isinstance(fields, str) else list(fields)
    canon = [_ALIASES.get(n, n) for n in names]
    unknown = [n for n in canon if n not in _ARRAYS and n not in ("image_id", "image_w", "image_h", "num_boxes")]
    if unknown:
        raise ValueError(f"fields: unknown TSV column(s) {unknown}; known: image_id, image_w, image_h, num_boxes, "
                         f"{', '.join(_ARRAYS)}")
    missing = [n for n in _REQUIRED if n not in canon]
    if missing:
        raise ValueError(f"fields: the TSV layout lacks required column(s) {missing}")
    return tuple(names)


def _decode_array(text: str, name: str, dtype: type, n: int, width: int | None, path: str, where: str) -> np.ndarray:
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise DataFormatError(path, where, f"column {name!r} is not valid base64 ({e})", reason=f"bad base64 in {name!r}") from None
    item = np.dtype(dtype).itemsize
    if width is None:
        # Width inferred: the byte count must be a whole number of rows.
        if n == 0 or len(raw) % (n * item):
            raise DataFormatError(path, where, f"column {name!r} has {len(raw)} bytes, not a multiple of "
                                  f"num_boxes*{item} = {n * item}", reason=f"size mismatch in {name!r}")
        width = len(raw) // (n * item)
    if len(raw) != n * width * item:
        raise DataFormatError(path, where, f"column {name!r} has {len(raw)} bytes, expected num_boxes*{width}*{item} "
                              f"= {n * width * item}", reason=f"size mismatch in {name!r}")
    arr = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).reshape(n, width)
    return arr.astype(dtype)


def iter_tsv(path: str | os.PathLike, *, fields: str | Sequence[str] | None = None, feat_dim: int | None = None,
             num_labels: int | None = None, report: ImportReport | None = None) -> Iterator[RegionInput]:
    """Read a bottom-up-attention TSV, one :class:`RegionInput` per line.

    Boxes are divided by the image size; soft labels are ``cls_prob`` when present (else None);
    ``conf`` is the largest non-background class probability when ``cls_prob`` is present, else
    ``objects_conf``, else 1. ``feat_dim`` / ``num_labels`` default to what the first line has and
    must then hold for every line.
    """
    path = os.fspath(path)
    report = report or ImportReport(os.path.basename(path))
    layout = parse_fields(fields)
    _set_csv_limit()
    with open(path, "rb") as fb:
        fb.seek(0, os.SEEK_END)
        size = fb.tell()
        if size:
            fb.seek(-1, os.SEEK_END)
        ends_with_newline = not size or fb.read(1) == b"\n"
    def lines(fb):
        # Decoded line by line, so a bad byte is reported at its own line (and can be skipped).
        for i, bline in enumerate(fb, 1):
            try:
                yield bline.decode("utf-8")
            except UnicodeDecodeError as e:
                report.bad(DataFormatError(path, f"line {i}", f"not UTF-8 text (byte {e.start} of the line)",
                                           reason="not UTF-8 text"))
                yield "\n"  # an empty row keeps csv's line count in step

    with open(path, "rb") as fb:
        reader = csv.reader(lines(fb), delimiter="\t", quoting=csv.QUOTE_NONE)
        rows = iter(reader)
        try:
            row = next(rows, None)
            while row is not None:
                lineno = reader.line_num
                nxt = next(rows, None)
                # The last line without its newline is where a copy that stopped early shows.
                truncated_tail = nxt is None and not ends_with_newline
                rec = None
                if row:
                    try:
                        rec = _tsv_record(row, layout, path, lineno, feat_dim, num_labels, truncated_tail)
                    except DataFormatError as e:
                        report.bad(e)
                if rec is not None:
                    # The first good line fixes the layout and sizes for the rest of the file.
                    layout = layout or TSV_LAYOUTS[len(row)]
                    feat_dim = feat_dim or rec.features.shape[1]
                    if num_labels is None and rec.soft_labels is not None:
                        num_labels = rec.soft_labels.shape[1]
                    yield rec
                row = nxt
        except csv.Error as e:
            raise DataFormatError(path, f"line {reader.line_num}", f"not a TSV line ({e})", reason="not a TSV line") from None


def _tsv_record(row: list[str], layout: tuple[str, ...] | None, path: str, lineno: int, feat_dim: int | None,
                num_labels: int | None, truncated_tail: bool) -> RegionInput:
    where = f"line {lineno}"
    if layout is None and len(row) not in TSV_LAYOUTS:
        problem = f"{len(row)} column(s); known layouts have {sorted(TSV_LAYOUTS)} (give the fields explicitly)"
        if truncated_tail:
            raise DataFormatError(path, where, f"truncated last line: {problem}", reason="truncated last line")
        raise DataFormatError(path, where, problem, reason="wrong column count")
    names = layout or TSV_LAYOUTS[len(row)]
    if len(row) != len(names):
        problem = f"{len(row)} column(s), expected {len(names)} ({', '.join(names)})"
        if truncated_tail:
            raise DataFormatError(path, where, f"truncated last line: {problem}", reason="truncated last line")
        raise DataFormatError(path, where, problem, reason="wrong column count")
    cols = {_ALIASES.get(n, n): v for n, v in zip(names, row)}
    img_id = cols["image_id"]
    where = f"line {lineno} (image_id {img_id})"
    ints = {}
    for k in ("image_w", "image_h", "num_boxes"):
        try:
            ints[k] = int(cols[k])
        except ValueError:
            raise DataFormatError(path, where, f"column {k!r} is not an integer: {cols[k]!r:.40}",
                                  reason=f"{k!r} is not an integer") from None
    w, h, n = ints["image_w"], ints["image_h"], ints["num_boxes"]
    if w <= 0 or h <= 0:
        raise DataFormatError(path, where, f"image size {w}x{h} is not positive", reason="bad image size")
    if n <= 0:
        raise DataFormatError(path, where, f"num_boxes is {n}", reason="no boxes")
    try:
        arrs = {}
        for name, (dtype, width) in _ARRAYS.items():
            if name not in cols:
                continue
            if name == "features":
                width = feat_dim
            elif name == "cls_prob":
                width = num_labels
            arrs[name] = _decode_array(cols[name], name, dtype, n, width, path, where)
    except DataFormatError as e:
        if truncated_tail:
            raise DataFormatError(path, where, f"truncated last line: {e.problem}", reason="truncated last line") from None
        raise
    for name, a in arrs.items():
        check_array(a, name, path, where)
    boxes = arrs["boxes"] / np.array([w, h, w, h], dtype=np.float32)
    soft = arrs.get("cls_prob")
    if soft is not None:
        conf = soft[:, 1:].max(axis=1)  # column 0 is the background class
    elif "objects_conf" in arrs:
        conf = arrs["objects_conf"][:, 0]
    else:
        conf = np.ones(n, dtype=np.float32)
    return RegionInput(img_id, arrs["features"], boxes, soft, conf.astype(np.float32), width=w, height=h,
                       source=path, where=where)


# --------------------------------------------------------------------------------------------
# UNITER img_db / npz


def decode_uniter_value(value: bytes, source: str, where: str) -> dict[str, np.ndarray]:
    """One img_db value -> dict of arrays; msgpack or ``np.savez`` bytes, detected by the zip magic."""
    if value[:4] == b"PK\x03\x04":
        try:
            with np.load(io.BytesIO(value), allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
            raise DataFormatError(source, where, f"unreadable npz value ({type(e).__name__}: {e})",
                                  reason="unreadable npz value") from None
    return unpack_msgpack_map(value, source, where)


def uniter_region(img_id: str, d: dict[str, Any], source: str, where: str, *, feat_dim: int | None,
                  num_labels: int | None) -> RegionInput:
    """Check one UNITER image dict (``features``, ``norm_bb``, ``conf``, ``soft_labels``)."""
    for name in ("features", "norm_bb"):
        if name not in d:
            raise DataFormatError(source, where, f"missing field {name!r}", reason=f"missing field {name!r}")
    arrs = {}
    for name in UNITER_FIELDS:
        if name in d:
            a = d[name]
            if not isinstance(a, np.ndarray):
                raise DataFormatError(source, where, f"field {name!r} is a {type(a).__name__}, not an array",
                                      reason=f"field {name!r} has the wrong type")
            arrs[name] = a
    n = arrs["features"].shape[0] if arrs["features"].ndim == 2 else -1
    check_array(arrs["features"], "features", source, where, shape=(None, feat_dim))
    check_array(arrs["norm_bb"], "norm_bb", source, where, shape=(n, 6))
    conf = None
    if "conf" in arrs:
        conf = arrs["conf"].reshape(-1) if arrs["conf"].ndim == 2 and arrs["conf"].shape[1] == 1 else arrs["conf"]
        check_array(conf, "conf", source, where, shape=(n,))
    soft = None
    if "soft_labels" in arrs:
        soft = check_array(arrs["soft_labels"], "soft_labels", source, where, shape=(n, num_labels))
    return RegionInput(img_id, arrs["features"], arrs["norm_bb"], soft, conf, source=source, where=where)


def _lmdb_open(path: str):
    import lmdb

    # Read-only, no lock file: the source may sit on a read-only mount.
    return lmdb.open(path, readonly=True, lock=False, create=False, readahead=False, subdir=True)


def nbb_side_file(db_dir: str) -> str | None:
    """``.../feat_th0.2_max100_min10[_compressed]`` -> ``.../nbb_th0.2_max100_min10.json`` if present."""
    name = os.path.basename(os.path.normpath(db_dir))
    m = re.match(r"feat_(.*?)(_compressed)?$", name)
    if not m:
        return None
    cand = os.path.join(os.path.dirname(os.path.normpath(db_dir)), f"nbb_{m.group(1)}.json")
    return cand if os.path.isfile(cand) else None


def iter_uniter_img_db(db_dir: str | os.PathLike, *, feat_dim: int | None = None, num_labels: int | None = None,
                       nbb: dict[str, int] | str | None = "auto", report: ImportReport | None = None
                       ) -> Iterator[RegionInput]:
    """Read an original UNITER img_db. Keys come from ``__keys__`` when present (else the cursor).

    ``nbb``: the ``nbb_*.json`` box counts to check each record against; ``"auto"`` finds the side
    file next to the folder, ``None`` skips the check.
    """
    from vlframe.data.importers.common import read_json

    db_dir = os.fspath(db_dir)
    report = report or ImportReport(os.path.basename(db_dir))
    if not os.path.isfile(os.path.join(db_dir, "data.mdb")):
        raise DataFormatError(db_dir, None, "not an LMDB folder (no data.mdb)", reason="not an LMDB folder")
    nbb_path = nbb_side_file(db_dir) if nbb == "auto" else nbb if isinstance(nbb, str) else None
    counts = read_json(nbb_path) if nbb_path else (nbb if isinstance(nbb, dict) else None)
    env = _lmdb_open(db_dir)
    try:
        with env.begin(buffers=False) as txn:
            keys_raw = txn.get(b"__keys__")
            if keys_raw is not None:
                try:
                    keys = json.loads(keys_raw)
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise DataFormatError(db_dir, "key '__keys__'", f"not a JSON list ({e})", reason="bad __keys__") from None
                if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
                    raise DataFormatError(db_dir, "key '__keys__'", "not a JSON list of strings", reason="bad __keys__")
            else:
                keys = [k.decode("utf-8") for k, _ in txn.cursor()]
            for key in keys:
                where = f"record {key!r}"
                try:
                    value = txn.get(key.encode("utf-8"))
                    if value is None:
                        raise DataFormatError(db_dir, where, "listed in __keys__ but absent", reason="key absent")
                    rec = uniter_region(key, decode_uniter_value(value, db_dir, where), db_dir, where,
                                        feat_dim=feat_dim, num_labels=num_labels)
                    if counts is not None and key in counts and counts[key] != rec.features.shape[0]:
                        raise DataFormatError(db_dir, where, f"{rec.features.shape[0]} boxes, {nbb_path or 'nbb'} says "
                                              f"{counts[key]}", reason="box count differs from nbb file")
                except DataFormatError as e:
                    report.bad(e)
                    continue
                feat_dim = feat_dim or rec.features.shape[1]
                if num_labels is None and rec.soft_labels is not None:
                    num_labels = rec.soft_labels.shape[1]
                yield rec
    finally:
        env.close()


def iter_npz_dir(folder: str | os.PathLike, *, feat_dim: int | None = None, num_labels: int | None = None,
                 report: ImportReport | None = None) -> Iterator[RegionInput]:
    """Read a folder of per-image UNITER ``.npz`` dumps (sorted by name); id = the file name."""
    folder = os.fspath(folder)
    report = report or ImportReport(os.path.basename(folder))
    names = sorted(n for n in os.listdir(folder) if n.endswith(".npz"))
    if not names:
        raise DataFormatError(folder, None, "no .npz files", reason="no .npz files")
    for name in names:
        path = os.path.join(folder, name)
        try:
            with open(path, "rb") as f:
                data = f.read()
            if data[:4] != b"PK\x03\x04":
                raise DataFormatError(path, "file", "not an npz (zip) file", reason="not an npz file")
            rec = uniter_region(name, decode_uniter_value(data, path, "file"), path, "file",
                                feat_dim=feat_dim, num_labels=num_labels)
        except DataFormatError as e:
            report.bad(e)
            continue
        feat_dim = feat_dim or rec.features.shape[1]
        if num_labels is None and rec.soft_labels is not None:
            num_labels = rec.soft_labels.shape[1]
        yield rec


# --------------------------------------------------------------------------------------------
# writing


def write_regions(records: Iterator[RegionInput], out: str | os.PathLike, report: ImportReport, *,
                  overwrite: bool = False) -> ImportReport:
    """Write records into a new region store; dims come from the first record.

    A record the store refuses (its ``ValueError`` names store and image) follows the skip policy.
    """
    from vlframe.data.stores import RegionStoreWriter

    out = os.fspath(out)
    writer = None
    # The writer is entered as a context: an error mid-way aborts it, so no meta record is written
    # and the half-written store is never taken for a complete one.
    with contextlib.ExitStack() as stack:
        for rec in records:
            if writer is None:
                num_labels = None if rec.soft_labels is None else rec.soft_labels.shape[1]
                writer = stack.enter_context(RegionStoreWriter(out, feat_dim=rec.features.shape[1],
                                                               num_labels=num_labels, overwrite=overwrite))
            try:
                writer.add(rec.img_id, features=rec.features, boxes=rec.boxes, soft_labels=rec.soft_labels,
                           conf=rec.conf, width=rec.width, height=rec.height)
            except ValueError as e:
                report.bad(DataFormatError(rec.source or report.name, rec.where or f"image {rec.img_id!r}", str(e),
                                           reason="refused by the store"))
                continue
            report.wrote()
    if writer is None:
        raise DataFormatError(report.name, None, f"no image could be read; nothing written to {out} "
                              f"(skipped: {dict(report.skipped)})",
                              reason="nothing to write")
    return report


def import_tsv(paths: str | os.PathLike | Sequence[str | os.PathLike], out: str | os.PathLike, *,
               fields: str | Sequence[str] | None = None, feat_dim: int | None = None, num_labels: int | None = None,
               skip_bad: bool = False, overwrite: bool = False) -> ImportReport:
    """bottom-up-attention TSV file(s) -> region store at ``out``."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    report = ImportReport(", ".join(os.path.basename(os.fspath(p)) for p in paths), skip_bad=skip_bad)

    def records():
        fd, nl = feat_dim, num_labels
        for p in paths:
            for rec in iter_tsv(p, fields=fields, feat_dim=fd, num_labels=nl, report=report):
                # Dims must agree across files too: the store has one feature size.
                fd = rec.features.shape[1]
                nl = None if rec.soft_labels is None else rec.soft_labels.shape[1]
                yield rec

    return write_regions(records(), out, report, overwrite=overwrite)


def import_uniter_img_db(db_dir: str | os.PathLike, out: str | os.PathLike, *, feat_dim: int | None = None,
                         num_labels: int | None = None, nbb: dict[str, int] | str | None = "auto",
                         skip_bad: bool = False, overwrite: bool = False) -> ImportReport:
    """Original UNITER img_db (either value encoding) -> region store at ``out``."""
    report = ImportReport(os.fspath(db_dir), skip_bad=skip_bad)
    return write_regions(iter_uniter_img_db(db_dir, feat_dim=feat_dim, num_labels=num_labels, nbb=nbb, report=report),
                         out, report, overwrite=overwrite)


def import_npz_dir(folder: str | os.PathLike, out: str | os.PathLike, *, feat_dim: int | None = None,
                   num_labels: int | None = None, skip_bad: bool = False, overwrite: bool = False) -> ImportReport:
    """Folder of UNITER per-image npz dumps -> region store at ``out`` (all boxes kept; the store
    picks K per image by confidence when read)."""
    report = ImportReport(os.fspath(folder), skip_bad=skip_bad)
    return write_regions(iter_npz_dir(folder, feat_dim=feat_dim, num_labels=num_labels, report=report),
                         out, report, overwrite=overwrite)


# --------------------------------------------------------------------------------------------
# CLI


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("tsv_features", help="bottom-up-attention TSV -> region store")
    p.add_argument("inputs", nargs="+", help="TSV file(s)")
    p.add_argument("--fields", default=None,
                   help="comma-separated column names (default: detected by count: "
                        + "; ".join(f"{n}: {','.join(v)}" for n, v in TSV_LAYOUTS.items()) + ")")
    p.add_argument("--feat-dim", type=int, default=None, help="expected feature size (default: from the first line)")
    p.add_argument("--num-labels", type=int, default=None, help="expected cls_prob size (default: from the first line)")
    add_common_args(p, text=False)
    p.set_defaults(func=run_tsv_cli)

    p = subparsers.add_parser("uniter_img_db", help="original UNITER img_db (LMDB, msgpack or npz values) -> region store")
    p.add_argument("input", help="img_db folder, e.g. .../feat_th0.2_max100_min10")
    p.add_argument("--nbb", default="auto", help="nbb_*.json to check box counts against ('auto': next to the folder; 'none')")
    p.add_argument("--feat-dim", type=int, default=None)
    p.add_argument("--num-labels", type=int, default=None)
    add_common_args(p, text=False)
    p.set_defaults(func=run_img_db_cli)

    p = subparsers.add_parser("uniter_npz", help="folder of UNITER per-image npz dumps -> region store")
    p.add_argument("input", help="folder of .npz files")
    p.add_argument("--feat-dim", type=int, default=None)
    p.add_argument("--num-labels", type=int, default=None)
    add_common_args(p, text=False)
    p.set_defaults(func=run_npz_cli)


def run_tsv_cli(args: argparse.Namespace) -> ImportReport:
    report = import_tsv(args.inputs, args.out, fields=args.fields, feat_dim=args.feat_dim, num_labels=args.num_labels,
                        skip_bad=args.skip_bad, overwrite=args.overwrite)
    print(report.summary())
    return report


def run_img_db_cli(args: argparse.Namespace) -> ImportReport:
    nbb = None if args.nbb == "none" else args.nbb
    report = import_uniter_img_db(args.input, args.out, feat_dim=args.feat_dim, num_labels=args.num_labels, nbb=nbb,
                                  skip_bad=args.skip_bad, overwrite=args.overwrite)
    print(report.summary())
    return report


def run_npz_cli(args: argparse.Namespace) -> ImportReport:
    report = import_npz_dir(args.input, args.out, feat_dim=args.feat_dim, num_labels=args.num_labels,
                            skip_bad=args.skip_bad, overwrite=args.overwrite)
    print(report.summary())
    return report
