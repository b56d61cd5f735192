"""Pieces every importer shares: the error type, the skip-or-stop policy with its counts, JSON and
JSONL readers that name the place of a problem, field checks, and the text encoder.

Policy: with ``skip_bad=False`` (the default) the first bad record raises :class:`DataFormatError`;
with ``skip_bad=True`` it is skipped and counted by reason, and :meth:`ImportReport.summary` lists
every count, so nothing is dropped silently.
"""
from __future__ import annotations

import argparse
import json
import os
import re
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class DataFormatError(ValueError):
    """Input that does not match its format. The message always names the file and the
    line/record: ``"annotations.json: record 17 (question_id 4): missing field 'answers'"``.

    ``reason`` is the short category used to count skips (e.g. ``"missing field 'answers'"``).
    """

    def __init__(self, source: str | os.PathLike, where: str | None, problem: str, *, reason: str | None = None):
        self.source = os.fspath(source)
        self.where = where
        self.problem = problem
        self.reason = reason or problem
        super().__init__(f"{self.source}: {where}: {problem}" if where else f"{self.source}: {problem}")


@dataclass
class ImportReport:
    """Counts of one import: records written, records skipped by reason."""

    name: str
    skip_bad: bool = False
    written: int = 0
    skipped: Counter = field(default_factory=Counter)
    first_example: dict[str, str] = field(default_factory=dict)
    noted: Counter = field(default_factory=Counter)  # records written that deserve a note, by reason

    def note(self, reason: str, n: int = 1) -> None:
        self.noted[reason] += n

    def wrote(self, n: int = 1) -> None:
        self.written += n

    def bad(self, err: DataFormatError) -> None:
        """Apply the policy to one bad record: raise it, or count it when ``skip_bad``."""
        if not self.skip_bad:
            raise err
        self.skip(err.reason, example=str(err))

    def skip(self, reason: str, *, n: int = 1, example: str | None = None) -> None:
        """Count a record left out on purpose (or by the skip policy) under ``reason``."""
        self.skipped[reason] += n
        if example is not None:
            self.first_example.setdefault(reason, example)

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        lines = [f"{self.name}: wrote {self.written} record(s), skipped {self.total_skipped}"]
        for reason, n in sorted(self.skipped.items(), key=lambda kv: (-kv[1], kv[0])):
            ex = self.first_example.get(reason)
            lines.append(f"  skipped {n}: {reason}" + (f"  (first: {ex})" if ex else ""))
        for reason, n in sorted(self.noted.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"  kept {n}: {reason}")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "written": self.written, "skipped": dict(self.skipped), "noted": dict(self.noted)}


# The one rule for --max-text-len in every importer: texts are stored whole (the dataset cuts at
# read time, to its own max_text_len, and counts what it cut); longer ones are counted here.
TOO_LONG = "text longer than max_text_len (kept whole)"


def count_too_long(report: ImportReport, token_ids: Sequence[int], max_text_len: int | None) -> None:
    if max_text_len is not None and len(token_ids) > max_text_len:
        report.note(TOO_LONG)


def check_max_text_len(max_text_len: int | None) -> None:
    if max_text_len is not None and max_text_len < 1:
        raise ValueError(f"max_text_len must be >= 1, got {max_text_len}")


_SURROGATE = re.compile("[\ud800-\udfff]")


def _decode(raw: bytes, path: str, report: ImportReport | None) -> str:
    """UTF-8 text of a whole file. A byte that is not UTF-8 raises naming the file and its offset;
    under ``report.skip_bad`` such bytes become lone surrogates instead, so each record that holds
    one is refused (and counted) by :func:`require` while the others are kept."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        if report is None or not report.skip_bad:
            raise DataFormatError(path, f"byte {e.start} (line {line})",
                                  f"not UTF-8 text ({e.reason}: {raw[e.start:e.end]!r}); --skip-bad skips the "
                                  "records that hold such bytes", reason="not UTF-8 text") from None
        return raw.decode("utf-8", "surrogateescape")


def read_json(path: str | os.PathLike, report: ImportReport | None = None) -> Any:
    """Whole-file JSON; a truncated or malformed file raises naming the file, line and column, a
    byte that is not UTF-8 naming its offset (see :func:`_decode` for ``report.skip_bad``)."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        text = _decode(f.read(), path, report)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        # The text ran out (or a string never closed, so it runs to the end): the file was cut.
        cut = e.pos >= len(text.rstrip()) or e.msg.startswith("Unterminated string")
        what = "truncated JSON" if cut else "malformed JSON"
        raise DataFormatError(path, f"line {e.lineno} column {e.colno}", f"{what}: {e.msg}", reason=what) from None


def iter_jsonl(path: str | os.PathLike, report: ImportReport | None = None) -> Iterator[tuple[int, Any]]:
    """Yield ``(line_number, object)`` for each non-blank line (numbers start at 1).

    A malformed line (bad JSON, or bytes that are not UTF-8: the message gives the file offset)
    raises naming its number, or is counted and skipped when ``report.skip_bad``.
    """
    path = os.fspath(path)
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            start, offset = offset, offset + len(raw)
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                obj = json.loads(line)
            except UnicodeDecodeError as e:
                err = DataFormatError(path, f"line {lineno} (byte {start + e.start} of the file)",
                                      f"not UTF-8 text ({e.reason}: {raw[e.start:e.end]!r})", reason="not UTF-8 text")
            except json.JSONDecodeError as e:
                err = DataFormatError(path, f"line {lineno}", f"malformed JSON: {e.msg} (column {e.colno})",
                                      reason="malformed JSON line")
            else:
                yield lineno, obj
                continue
            if report is None:
                raise err from None
            report.bad(err)


def require(record: Any, name: str, types: type | tuple[type, ...], source: str | os.PathLike, where: str) -> Any:
    """``record[name]``, checked to exist and to have one of ``types`` (bool never counts as int)."""
    if not isinstance(record, Mapping):
        raise DataFormatError(source, where, f"expected an object, got {type(record).__name__}",
                              reason="record is not an object")
    if name not in record:
        raise DataFormatError(source, where, f"missing field {name!r}", reason=f"missing field {name!r}")
    value = record[name]
    types_t = types if isinstance(types, tuple) else (types,)
    if (isinstance(value, bool) and bool not in types_t) or not isinstance(value, types_t):
        want = " or ".join(t.__name__ for t in types_t)
        raise DataFormatError(source, where, f"field {name!r} should be {want}, got {type(value).__name__} {value!r:.60}",
                              reason=f"field {name!r} has the wrong type")
    if isinstance(value, str) and (m := _SURROGATE.search(value)):
        # a "\\ud800" escape in the JSON, or a byte that is not UTF-8 read under --skip-bad
        raise DataFormatError(source, where, f"field {name!r} is not valid text: lone surrogate U+{ord(m.group()):04X} "
                              f"at character {m.start()} (a \\u escape of half a pair, or a byte that is not UTF-8)",
                              reason=f"field {name!r} is not valid text")
    return value


def check_array(arr: np.ndarray, name: str, source: str | os.PathLike, where: str, *,
                shape: tuple[int | None, ...] | None = None) -> np.ndarray:
    """Raise unless ``arr`` has ``shape`` (``None`` = any size) and only finite values."""
    if shape is not None and (arr.ndim != len(shape) or any(s is not None and s != d for s, d in zip(shape, arr.shape))):
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise DataFormatError(source, where, f"{name} has shape {list(arr.shape)}, expected {want}",
                              reason=f"{name} has the wrong shape")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise DataFormatError(source, where, f"{name} contains NaN or Inf", reason=f"{name} is not finite")
    return arr


# Only the ids are stored; skipping the masks saves building them for every text.
_ENCODE_KW = {"add_special_tokens": False, "return_attention_mask": False, "return_token_type_ids": False}


class TextEncoder:
    """Our tokenizer, used once at import time: raw text -> ids without CLS/SEP, never cut (see
    :data:`TOO_LONG`). :meth:`store_kwargs` gives the ``TextStoreWriter`` arguments that describe it.
    """

    def __init__(self, tokenizer: Any = None, *, tokenizer_name: str | None = None):
        if tokenizer is None:
            from vlframe.data.tokenizer import build_tokenizer

            tokenizer = build_tokenizer()
            tokenizer_name = tokenizer_name or "bert-base-uncased"
        self.tokenizer = tokenizer
        self.tokenizer_name = tokenizer_name or getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, **_ENCODE_KW)["input_ids"]

    def encode_many(self, texts: list[str]) -> list[list[int]]:
        # The fast tokenizer works on a list in one call, far quicker than one text at a time.
        if not texts:
            return []
        return list(self.tokenizer(texts, **_ENCODE_KW)["input_ids"])

    def store_kwargs(self) -> dict[str, Any]:
        t = self.tokenizer
        special = {"cls": t.cls_token_id, "sep": t.sep_token_id, "mask": t.mask_token_id,
                   "pad": t.pad_token_id, "unk": t.unk_token_id}
        return {"tokenizer_name": self.tokenizer_name, "special_ids": special, "vocab_size": len(t)}


def region_store_ids(path: str | os.PathLike) -> set[str]:
    """Image ids of an existing region store, to check that annotations point at real features."""
    from vlframe.data.stores import RegionStore

    return set(RegionStore(os.fspath(path)).ids())


def add_common_args(p: argparse.ArgumentParser, *, text: bool = True) -> None:
    """Arguments every import subcommand takes."""
    p.add_argument("--out", required=True, help="output store folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output store")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip malformed records and count them by reason instead of stopping at the first")
    if text:
        p.add_argument("--max-text-len", type=int, default=None,
                       help="count texts longer than this many wordpieces (kept whole; the dataset cuts at read time)")
        p.add_argument("--tokenizer", default=None,
                       help="tokenizer folder or vocab.txt (default: the bundled bert-base-uncased vocabulary)")


def encoder_from_args(args: argparse.Namespace) -> TextEncoder:
    if getattr(args, "tokenizer", None):
        from vlframe.data.tokenizer import build_tokenizer

        return TextEncoder(build_tokenizer(args.tokenizer), tokenizer_name=args.tokenizer)
    return TextEncoder()


class _RefusedValue(ValueError):
    """A msgpack-numpy value that is not a plain numeric array or scalar."""


# Plain numeric dtypes only: bool, signed/unsigned int, float, complex (no object, no structured).
_PLAIN_DTYPE = re.compile(r"^[<>|=]?[biufc]\d{1,2}$")


def _text(v: Any) -> Any:
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else v


def _plain_array_hook(obj: dict) -> Any:
    """msgpack object hook: a msgpack-numpy array/scalar map -> numpy, read as dtype + shape + bytes.

    msgpack-numpy's own ``decode`` unpickles object arrays (``kind == 'O'``), so a crafted store
    would run code; here anything but a plain numeric array is refused."""
    def get(name: str) -> Any:
        return obj.get(name.encode(), obj.get(name))

    if get("complex") is not None and get("nd") is None:
        raise _RefusedValue("a msgpack-numpy complex value (only plain numeric arrays are read)")
    nd = get("nd")
    if nd is None:
        return obj
    kind, dtype_str, data = _text(get("kind")), _text(get("type")), get("data")
    if kind not in (None, ""):
        what = "an object array (msgpack-numpy would unpickle it)" if kind == "O" else f"an array of kind {kind!r}"
        raise _RefusedValue(f"{what}; only plain numeric arrays are read")
    if not isinstance(dtype_str, str) or not _PLAIN_DTYPE.match(dtype_str):
        raise _RefusedValue(f"an array of dtype {dtype_str!r:.40}; only plain numeric arrays are read")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise _RefusedValue(f"an array whose data is a {type(data).__name__}, not bytes")
    dtype = np.dtype(dtype_str)
    if nd is not True:  # a numpy scalar
        if len(data) != dtype.itemsize:
            raise _RefusedValue(f"a {dtype_str} scalar of {len(data)} bytes")
        return np.frombuffer(data, dtype=dtype)[0]
    shape = get("shape")
    if not isinstance(shape, (list, tuple)) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                        for d in shape):
        raise _RefusedValue(f"an array with shape {shape!r:.40}")
    if len(data) != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
        raise _RefusedValue(f"a {dtype_str} array of shape {list(shape)} with {len(data)} bytes")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def unpack_msgpack_map(data: bytes, source: str, where: str) -> dict[str, Any]:
    """A msgpack map (arrays in msgpack-numpy's layout) as the original UNITER writers store it,
    with str keys; a bad or refused value raises DataFormatError naming ``source`` and ``where``.
    Arrays are rebuilt from dtype, shape and bytes only: no code runs from the data."""
    import msgpack

    try:
        obj = msgpack.unpackb(data, object_hook=_plain_array_hook, raw=False)
    except _RefusedValue as e:
        raise DataFormatError(source, where, f"refused value: {e}", reason="refused non-plain value") from None
    except (ValueError, msgpack.exceptions.UnpackException, TypeError, KeyError) as e:
        raise DataFormatError(source, where, f"unreadable msgpack value ({type(e).__name__}: {e})",
                              reason="unreadable msgpack value") from None
    if not isinstance(obj, dict):
        raise DataFormatError(source, where, f"value is a msgpack {type(obj).__name__}, expected a map",
                              reason="value is not a map")
    return {k.decode("utf-8") if isinstance(k, bytes) else k: v for k, v in obj.items()}
