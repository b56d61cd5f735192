"""Original UNITER ``txt_db`` -> vlframe text store.

The txt_db is an LMDB folder: key = text id, value = ``lz4.frame`` compressed msgpack of
``{input_ids (bert-base-cased ids, no CLS/SEP), img_fname, raw, ...task fields}``, next to
``id2len.json``, ``txt2img.json``, ``img2txts.json`` and ``meta.json``
(``{"bert": ..., "UNK", "CLS", "SEP", "MASK", "v_range": [lo, hi]}``).

By default the original token ids are kept and the store's meta records the original tokenizer
(its special ids from meta.json; [PAD] = 0 as in BERT's vocabulary; vocab_size = ``v_range[1]``).
``retokenize=True`` re-tokenises ``raw`` with our tokenizer instead. Every other field of a
record goes to ``extra``; ``img_fname`` becomes ``img_id`` (a list of names, as NLVR2 and VCR have,
gives its first name as ``img_id`` and keeps the whole list in ``extra['img_fname']``).
"""
from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from vlframe.data.importers.common import (DataFormatError, ImportReport, TextEncoder, add_common_args,
                                           check_max_text_len, count_too_long, encoder_from_args, read_json, require,
                                           unpack_msgpack_map)

SIDE_FILES = ("id2len.json", "txt2img.json", "img2txts.json", "meta.json")


@dataclass
class UniterText:
    txt_id: str
    input_ids: list[int]
    img_fname: Any  # str, a list of str, or None
    raw: str | None
    extra: dict[str, Any]


def _plain(x: Any) -> Any:
    """Numpy values (msgpack-numpy dumps may hold them) -> plain lists/numbers for our store."""
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, bytes):
        return x.decode("utf-8")
    if isinstance(x, dict):
        return {_plain(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def read_meta(db_dir: str) -> dict[str, Any]:
    path = os.path.join(db_dir, "meta.json")
    if not os.path.isfile(path):
        raise DataFormatError(db_dir, None, "no meta.json (the txt_db's tokenizer description)", reason="no meta.json")
    meta = read_json(path)
    for k in ("bert", "UNK", "CLS", "SEP", "MASK"):
        require(meta, k, str if k == "bert" else int, path, "meta")
    v_range = require(meta, "v_range", list, path, "meta")
    if len(v_range) != 2 or not all(isinstance(v, int) for v in v_range):
        raise DataFormatError(path, "meta", f"field 'v_range' should be [first, end] ints, got {v_range!r}",
                              reason="bad v_range")
    return meta


def decode_txt_value(value: bytes, source: str, where: str) -> dict[str, Any]:
    import lz4.frame

    try:
        data = lz4.frame.decompress(value)
    except RuntimeError as e:  # lz4 reports a bad or cut frame as RuntimeError
        raise DataFormatError(source, where, f"not a complete lz4 frame ({e})", reason="unreadable lz4 value") from None
    return unpack_msgpack_map(data, source, where)


def iter_uniter_txt_db(db_dir: str | os.PathLike, *, vocab_end: int | None = None,
                       report: ImportReport | None = None, keys_seen: set[str] | None = None) -> Iterator[UniterText]:
    """Read every record of a txt_db (keys in LMDB order). ``vocab_end`` bounds the token ids;
    ``keys_seen`` collects every key met, readable or not."""
    import lmdb

    db_dir = os.fspath(db_dir)
    report = report or ImportReport(os.path.basename(db_dir))
    if not os.path.isfile(os.path.join(db_dir, "data.mdb")):
        raise DataFormatError(db_dir, None, "not an LMDB folder (no data.mdb)", reason="not an LMDB folder")
    env = lmdb.open(db_dir, readonly=True, lock=False, create=False, readahead=False)
    try:
        with env.begin(buffers=False) as txn:
            for key, value in txn.cursor():
                txt_id = key.decode("utf-8")
                if keys_seen is not None:
                    keys_seen.add(txt_id)
                where = f"record {txt_id!r}"
                try:
                    rec = _record(txt_id, decode_txt_value(value, db_dir, where), db_dir, where, vocab_end)
                except DataFormatError as e:
                    report.bad(e)
                    continue
                yield rec
    finally:
        env.close()


def _record(txt_id: str, d: dict[str, Any], source: str, where: str, vocab_end: int | None) -> UniterText:
    ids = require(d, "input_ids", (list, np.ndarray), source, where)
    ids = _plain(ids)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise DataFormatError(source, where, "field 'input_ids' should hold integers", reason="input_ids not integers")
    if vocab_end is not None and ids and not (0 <= min(ids) and max(ids) < vocab_end):
        raise DataFormatError(source, where, f"input_ids outside the vocabulary [0, {vocab_end}): "
                              f"min {min(ids)}, max {max(ids)}", reason="token id outside the vocabulary")
    raw = d.get("raw")
    if raw is not None and not isinstance(raw, str):
        raise DataFormatError(source, where, f"field 'raw' should be str, got {type(raw).__name__}",
                              reason="field 'raw' has the wrong type")
    img = _plain(d.get("img_fname"))
    if img is not None and not isinstance(img, str) and not (isinstance(img, list) and img and
                                                             all(isinstance(x, str) for x in img)):
        raise DataFormatError(source, where, f"field 'img_fname' should be a name or a list of names, got {img!r:.60}",
                              reason="field 'img_fname' has the wrong type")
    extra = {k: _plain(v) for k, v in d.items() if k not in ("input_ids", "raw", "img_fname")}
    return UniterText(txt_id, ids, img, raw, extra)


def import_uniter_txt_db(db_dir: str | os.PathLike, out: str | os.PathLike, *, retokenize: bool = False,
                         encoder: TextEncoder | None = None, max_text_len: int | None = None,
                         check_side_files: bool = True, skip_bad: bool = False,
                         overwrite: bool = False) -> ImportReport:
    """Original UNITER txt_db -> text store at ``out``.

    ``check_side_files``: the written txt2img must equal ``txt2img.json`` (for the records kept)
    and every id of ``id2len.json`` must be a record (or a counted skip).
    """
    from vlframe.data.stores import TextStoreWriter

    db_dir = os.fspath(db_dir)
    report = ImportReport(db_dir, skip_bad=skip_bad)
    meta = read_meta(db_dir)
    check_max_text_len(max_text_len)
    if retokenize:
        encoder = encoder or TextEncoder()
        store_kwargs = encoder.store_kwargs()
    else:
        store_kwargs = {
            "tokenizer_name": meta["bert"],
            # [PAD] is id 0 in every BERT vocabulary; the original pads with 0 too.
            "special_ids": {"cls": meta["CLS"], "sep": meta["SEP"], "mask": meta["MASK"], "pad": 0, "unk": meta["UNK"]},
            "vocab_size": meta["v_range"][1],
        }
    txt2img_ref = id2len_ref = None
    if check_side_files:
        p = os.path.join(db_dir, "txt2img.json")
        txt2img_ref = read_json(p) if os.path.isfile(p) else None
        p = os.path.join(db_dir, "id2len.json")
        id2len_ref = read_json(p) if os.path.isfile(p) else None

    keys_seen: set[str] = set()
    records = list(iter_uniter_txt_db(db_dir, vocab_end=None if retokenize else meta["v_range"][1], report=report,
                                      keys_seen=keys_seen))
    if id2len_ref is not None:
        for k in id2len_ref:
            if k not in keys_seen:
                report.bad(DataFormatError(os.path.join(db_dir, "id2len.json"), f"id {k!r}", "listed but not in the LMDB",
                                           reason="id2len id not in the LMDB"))
    if retokenize:
        kept = []
        for r in records:
            if r.raw is None:
                report.bad(DataFormatError(db_dir, f"record {r.txt_id!r}", "missing field 'raw' (needed to re-tokenise)",
                                           reason="missing field 'raw'"))
            else:
                kept.append(r)
        records = kept
        new_ids = encoder.encode_many([r.raw for r in records])
    else:
        new_ids = [r.input_ids for r in records]

    with TextStoreWriter(os.fspath(out), overwrite=overwrite, **store_kwargs) as w:
        for r, ids in zip(records, new_ids):
            where = f"record {r.txt_id!r}"
            if txt2img_ref is not None and r.txt_id in txt2img_ref and txt2img_ref[r.txt_id] != r.img_fname:
                report.bad(DataFormatError(db_dir, where, f"img_fname {r.img_fname!r} but txt2img.json says "
                                           f"{txt2img_ref[r.txt_id]!r}", reason="img_fname differs from txt2img.json"))
                continue
            extra = dict(r.extra)
            img_id = r.img_fname
            if isinstance(img_id, list):
                extra["img_fname"] = img_id
                img_id = img_id[0]
            try:
                w.add(r.txt_id, token_ids=ids, img_id=img_id, raw=r.raw, extra=extra or None)
            except ValueError as e:
                report.bad(DataFormatError(db_dir, where, str(e), reason="refused by the store"))
                continue
            count_too_long(report, ids, max_text_len)
            report.wrote()
    return report


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("uniter_txt_db", help="original UNITER txt_db (LMDB of lz4 msgpack) -> text store")
    p.add_argument("input", help="txt_db folder, e.g. .../coco_train.db")
    p.add_argument("--retokenize", action="store_true",
                   help="re-tokenise 'raw' with our tokenizer (default: keep the original bert-base-cased ids)")
    p.add_argument("--no-side-file-check", dest="check_side_files", action="store_false",
                   help="do not compare with txt2img.json / id2len.json")
    add_common_args(p, text=True)
    p.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> ImportReport:
    encoder = encoder_from_args(args) if args.retokenize else None
    report = import_uniter_txt_db(args.input, args.out, retokenize=args.retokenize, encoder=encoder,
                                  max_text_len=args.max_text_len, check_side_files=args.check_side_files,
                                  skip_bad=args.skip_bad, overwrite=args.overwrite)
    print(report.summary())
    return report
