"""Importers of the public finetuning-task annotation formats into a text store.

One text record per example; the task's targets go into the record's ``extra`` dict:

* VQA v2 (:func:`import_vqa`): questions JSON (+ annotations JSON for train/val). txt_id =
  question_id. extra = {question_id, answers: [labels], scores: [soft scores], answer_type,
  question_type}; test questions (no annotations) get only {question_id}. Answers are normalised
  and scored as the official evaluation does (:mod:`vlframe.data.vqa_vocab`); answers outside the
  vocabulary are left out of ``answers``/``scores`` (a question with none is kept and counted).
  The vocabulary used is saved in the store folder as ``answer_vocab.json`` (label i = entry i).
* NLVR2 (:func:`import_nlvr2`): JSONL. txt_id = identifier ``<split>-<set>-<pair>-<sent>``; its two
  images are ``<split>-<set>-<pair>-img0`` / ``-img1``. img_id = the left image.
  extra = {img_ids: [left, right], label: 1 for "True" / 0 for "False", identifier}.
* SNLI-VE (:func:`import_snli_ve`): JSONL. txt_id = pairID, text = the hypothesis (sentence2),
  img_id = the Flickr30K image stem. extra = {label, pair_id} with label 0 = entailment,
  1 = neutral, 2 = contradiction (:data:`SNLI_VE_LABELS`). A "-" gold label (no annotator
  consensus in SNLI) has no class: such pairs are skipped and counted, never silently.
* RefCOCO / RefCOCO+ / RefCOCOg (:func:`import_refcoco`): ``refs(unc).p`` / ``refs(umd).p`` (a
  pickle read by :class:`SafeUnpickler`, which refuses every global, so no code can run) plus the
  COCO ``instances.json``. One record per sentence, txt_id = sent_id. extra = {ref_id, ann_id,
  target_box: the referred box as normalised [x1, y1, x2, y2], category_id, split}.
* VCR (:func:`import_vcr`): JSONL. One record per question, txt_id = annot_id, token_ids = the
  question. Object references (lists of detection indices inside the token lists) are written as
  the object's class name ("person"), several joined by "and"; with ``ref_style="name"``, people
  get gender-neutral names instead (:data:`VCR_PERSON_NAMES`, by index, cycling), as R2C did.
  extra = {answer_choices: [token ids per choice], rationale_choices: [...], answer_label,
  rationale_label (both absent on the unlabelled test split), objects: class names,
  object_refs / answer_refs / rationale_refs: [start, end, object index] token spans
  (``token_ids[start:end]`` render that object)}.

Each importer reads everything and checks it before the store is opened, so a strict import that
fails leaves nothing behind. With ``region_store`` set, every image a record needs must have
features there. Texts longer than ``max_text_len`` wordpieces are kept whole (the dataset cuts at
read time) and counted in the report. Image ids come from ``img_id_format``: a ``str.format``
template over the fields each importer documents (plain field names and format specs only, e.g.
``"COCO_train2014_{image_id:012d}"``) or a callable taking those fields as a dict.
"""
from __future__ import annotations

import argparse
import os
import pickle
import string
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from vlframe.data.importers.common import (
    TOO_LONG,
    DataFormatError,
    ImportReport,
    TextEncoder,
    add_common_args,
    check_max_text_len,
    count_too_long,
    iter_jsonl,
    read_json,
    region_store_ids,
    require,
)
from vlframe.data.vqa_vocab import answer_scores, build_answer_vocab, load_answer_vocab, save_answer_vocab

SNLI_VE_LABELS = ("entailment", "neutral", "contradiction")
NLVR2_LABELS = {"False": 0, "True": 1}
VCR_PERSON_NAMES = (
    "Casey", "Riley", "Jessie", "Jackie", "Avery", "Jaime", "Peyton", "Kerry", "Jody", "Kendall",
    "Skyler", "Frankie", "Pat", "Quinn", "Morgan", "Jordan", "Taylor", "Alex", "Robin", "Sam",
)


TaskImportReport = ImportReport  # the shared report (with its notes), under the name tasks' importers return


@dataclass
class _Item:
    """One record to write, already checked."""

    txt_id: str
    raw: str
    img_ids: list[str]  # every image the record needs; the first is the record's img_id
    extra: dict[str, Any]
    source: str
    where: str
    token_ids: list[int] | None = None  # set when the importer tokenised it itself (VCR)


# --------------------------------------------------------------------------- shared plumbing


class _ImgIdFormat:
    """``img_id_format`` checked once: only the documented field names, no attribute/index access."""

    def __init__(self, fmt: str | Callable[[dict[str, Any]], str], fields: Sequence[str], key: str = "img_id_format"):
        self.key = key
        if callable(fmt):
            self.fn = fmt
            return
        if not isinstance(fmt, str):
            raise TypeError(f"{key}: expected a format string or a callable, got {type(fmt).__name__}")
        try:
            parsed = list(string.Formatter().parse(fmt))
        except ValueError as e:
            raise ValueError(f"{key}: invalid format string {fmt!r}: {e}") from None
        if any(spec and "{" in spec for _, _, spec, _ in parsed):
            raise ValueError(f"{key}: nested fields inside a format spec are not allowed in {fmt!r}")
        names = [name for _, name, _, _ in parsed if name is not None]
        if not names:
            raise ValueError(f"{key}: {fmt!r} uses no field; available: {', '.join(fields)}")
        for name in names:
            if name not in fields:
                raise ValueError(f"{key}: unknown field {{{name}}} in {fmt!r}; available: {', '.join(fields)}")
        self.fn = lambda values: fmt.format(**values)

    def __call__(self, values: dict[str, Any], source: str, where: str) -> str:
        try:
            out = self.fn(values)
        except (ValueError, TypeError, KeyError) as e:
            raise DataFormatError(source, where, f"{self.key} cannot format {values}: {e}", reason=f"{self.key} failed") from None
        if not isinstance(out, str) or not out:
            raise DataFormatError(source, where, f"{self.key} gave {out!r}, expected a non-empty string", reason=f"{self.key} failed")
        return out


def _check_out(out: str | os.PathLike, overwrite: bool) -> None:
    # Fail before reading a large input, not after (the writer checks again when it opens).
    path = os.fspath(out)
    if not overwrite and os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise FileExistsError(f"text store {path}: already exists (pass overwrite=True / --overwrite to replace it)")


def _encoder(tokenizer: Any) -> TextEncoder:
    if isinstance(tokenizer, TextEncoder):
        return tokenizer
    return TextEncoder(tokenizer)


def _region_ids(region_store: Any) -> tuple[set[str], str] | None:
    if region_store is None:
        return None
    if isinstance(region_store, (str, os.PathLike)):
        return region_store_ids(region_store), os.fspath(region_store)
    return set(region_store.ids()), str(getattr(region_store, "path", "region store"))


def _check_images(items: Iterable[_Item], region: tuple[set[str], str] | None, report: ImportReport) -> list[_Item]:
    ids_seen: dict[str, str] = {}
    kept = []
    for it in items:
        if it.txt_id in ids_seen:
            report.bad(DataFormatError(it.source, it.where, f"text id {it.txt_id!r} already used by {ids_seen[it.txt_id]}",
                                       reason="duplicate text id"))
            continue
        if region is not None:
            ids, store = region
            missing = [i for i in it.img_ids if i not in ids]
            if missing:
                report.bad(DataFormatError(it.source, it.where, f"image {missing[0]!r} has no features in region store {store}",
                                           reason="image not in region store"))
                continue
        ids_seen[it.txt_id] = it.where
        kept.append(it)
    return kept


def _tokenize(items: list[_Item], encoder: TextEncoder, report: ImportReport, chunk: int = 4096) -> list[_Item]:
    """Token ids for every item (one tokenizer call per chunk); a text with no tokens is bad."""
    kept = []
    for start in range(0, len(items), chunk):
        part = items[start:start + chunk]
        todo = [it for it in part if it.token_ids is None]
        for it, ids in zip(todo, encoder.encode_many([it.raw for it in todo])):
            it.token_ids = list(ids)
        for it in part:
            if not it.token_ids:
                report.bad(DataFormatError(it.source, it.where, f"text {it.raw!r:.60} has no tokens", reason="empty text"))
                continue
            kept.append(it)
    return kept


def _write(items: list[_Item], *, out: str | os.PathLike, encoder: TextEncoder, report: TaskImportReport,
           max_text_len: int | None, overwrite: bool) -> None:
    from vlframe.data.stores import TextStoreWriter

    with TextStoreWriter(os.fspath(out), **encoder.store_kwargs(), overwrite=overwrite) as writer:
        for it in items:
            count_too_long(report, it.token_ids, max_text_len)
            writer.add(it.txt_id, token_ids=it.token_ids, img_id=it.img_ids[0] if it.img_ids else None,
                       raw=it.raw, extra=it.extra)
            report.wrote()


def _guard(report: ImportReport, parse: Callable[..., _Item | None], records: Iterable[tuple]) -> Iterator[_Item]:
    """``parse(*record)`` for each record; a DataFormatError stops or is counted, per the skip policy."""
    for args in records:
        try:
            item = parse(*args)
        except DataFormatError as err:
            report.bad(err)
            continue
        if item is not None:
            yield item


def _list_field(container: Any, name: str, source: str) -> list:
    if not isinstance(container, Mapping):
        raise DataFormatError(source, None, f"expected a JSON object with {name!r}, got {type(container).__name__}",
                              reason="wrong top-level type")
    if name not in container:
        raise DataFormatError(source, None, f"missing top-level field {name!r}", reason=f"missing field {name!r}")
    value = container[name]
    if not isinstance(value, list):
        raise DataFormatError(source, None, f"top-level field {name!r} should be a list, got {type(value).__name__}",
                              reason=f"field {name!r} has the wrong type")
    return value


def _run(items: Iterable[_Item], report: TaskImportReport, *, out, tokenizer, max_text_len, region_store,
         overwrite) -> TaskImportReport:
    check_max_text_len(max_text_len)
    encoder = _encoder(tokenizer)
    region = _region_ids(region_store)
    # Everything is checked before the store is opened: a strict import that fails writes nothing.
    checked = _tokenize(_check_images(items, region, report), encoder, report)
    _write(checked, out=out, encoder=encoder, report=report, max_text_len=max_text_len, overwrite=overwrite)
    return report


# --------------------------------------------------------------------------- VQA v2

VQA_IMG_FIELDS = ("image_id", "data_subtype")
VQA_VOCAB_FILE = "answer_vocab.json"  # written into the text store folder: JSON list, answer i = label i


def read_vqa_vocab_source(annotation_files: Sequence[str | os.PathLike], report: ImportReport | None = None) -> list[str]:
    """Every ``multiple_choice_answer`` of the given VQA annotation files.

    A record without one raises, or (``report.skip_bad``) is left out of the counts and counted.
    """
    answers = []
    for path in annotation_files:
        src = os.fspath(path)
        for i, ann in enumerate(_list_field(read_json(src, report), "annotations", src)):
            try:
                answers.append(require(ann, "multiple_choice_answer", str, src, f"record {i}"))
            except DataFormatError as err:
                if report is None:
                    raise
                report.bad(DataFormatError(err.source, err.where, f"{err.problem} (vocabulary source)",
                                           reason=f"vocabulary source: {err.reason}"))
    return answers


def build_vqa_vocab(annotation_files: Sequence[str | os.PathLike], *, min_count: int = 9,
                    out: str | os.PathLike | None = None, report: ImportReport | None = None) -> list[str]:
    """The answer vocabulary of the common recipe from train+val annotation files (saved if ``out``)."""
    vocab = build_answer_vocab(read_vqa_vocab_source(annotation_files, report), min_count=min_count)
    if not vocab:
        raise ValueError(f"no answer occurs {min_count} or more times in {', '.join(map(os.fspath, annotation_files))}")
    if out is not None:
        save_answer_vocab(vocab, out)
    return vocab


def _vqa_annotation(ann: Any, src: str, where: str, ans2label: Mapping[str, int]) -> tuple[int, dict]:
    qid = require(ann, "question_id", int, src, where)
    where = f"{where} (question_id {qid})"
    image_id = require(ann, "image_id", int, src, where)
    answers = require(ann, "answers", list, src, where)
    require(ann, "multiple_choice_answer", str, src, where)
    answer_type = require(ann, "answer_type", str, src, where)
    question_type = require(ann, "question_type", str, src, where)
    if not answers:
        raise DataFormatError(src, where, "field 'answers' is empty", reason="no human answers")
    texts = [require(a, "answer", str, src, f"{where} answers[{j}]") for j, a in enumerate(answers)]
    scored = [(ans2label[a], s) for a, s in answer_scores(texts).items() if a in ans2label]
    scored.sort(key=lambda ls: (-ls[1], ls[0]))
    extra = {"question_id": qid, "answers": [lab for lab, _ in scored], "scores": [float(s) for _, s in scored],
             "answer_type": answer_type, "question_type": question_type}
    return image_id, extra


def import_vqa(questions: str | os.PathLike, annotations: str | os.PathLike | None = None, *, out: str | os.PathLike,
               answer_vocab: str | os.PathLike | Sequence[str] | None = None,
               vocab_annotations: Sequence[str | os.PathLike] | None = None, min_answer_count: int = 9,
               answer_vocab_out: str | os.PathLike | None = None,
               img_id_format: str | Callable[[dict], str] = "{image_id}", tokenizer: Any = None,
               skip_bad: bool = False, max_text_len: int | None = None, region_store: Any = None,
               overwrite: bool = False) -> TaskImportReport:
    """VQA v2 questions (+ annotations) -> text store.

    The answer vocabulary is ``answer_vocab`` (a file for :func:`load_answer_vocab` or a list), else
    built from ``vocab_annotations`` (train+val annotation files; default: ``annotations``) with
    ``min_answer_count``; ``answer_vocab_out`` saves the one used. Without ``annotations`` (test
    split) no vocabulary is needed. img_id fields: ``image_id`` (int), ``data_subtype`` (e.g.
    "train2014", from the questions file).
    """
    report = TaskImportReport("vqa", skip_bad=skip_bad)
    _check_out(out, overwrite)
    fmt = _ImgIdFormat(img_id_format, VQA_IMG_FIELDS)
    qsrc = os.fspath(questions)
    qdata = read_json(qsrc, report)
    qlist = _list_field(qdata, "questions", qsrc)
    subtype = qdata.get("data_subtype")  # absent -> an img_id_format that uses it fails, naming the record

    vocab: list[str] | None = None
    if annotations is not None:
        if answer_vocab is None:
            vocab = build_vqa_vocab(list(vocab_annotations or [annotations]), min_count=min_answer_count, report=report)
        elif isinstance(answer_vocab, (str, os.PathLike)):
            vocab = load_answer_vocab(answer_vocab)
        else:
            vocab = list(answer_vocab)
        if answer_vocab_out is not None:
            save_answer_vocab(vocab, answer_vocab_out)
    ans2label = {a: i for i, a in enumerate(vocab or [])}

    anns: dict[int, tuple[int, dict, str]] | None = None
    if annotations is not None:
        asrc = os.fspath(annotations)
        anns = {}
        for i, ann in enumerate(_list_field(read_json(asrc, report), "annotations", asrc)):
            try:
                image_id, extra = _vqa_annotation(ann, asrc, f"record {i}", ans2label)
                qid = extra["question_id"]
                if qid in anns:
                    raise DataFormatError(asrc, f"record {i} (question_id {qid})", f"question_id {qid} annotated twice",
                                          reason="duplicate question_id")
            except DataFormatError as err:
                report.bad(err)
                continue
            anns[qid] = (image_id, extra, f"record {i}")

    def parse(i: int, q: Any) -> _Item:
        where = f"record {i}"
        qid = require(q, "question_id", int, qsrc, where)
        where = f"record {i} (question_id {qid})"
        image_id = require(q, "image_id", int, qsrc, where)
        text = require(q, "question", str, qsrc, where)
        if anns is None:
            extra = {"question_id": qid}
        else:
            if qid not in anns:
                raise DataFormatError(qsrc, where, f"no annotation for question_id {qid} in {os.fspath(annotations)}",
                                      reason="question without annotation")
            ann_image, extra, ann_where = anns.pop(qid)
            if not extra["answers"]:
                report.note("no answer in the answer vocabulary")
            if ann_image != image_id:
                raise DataFormatError(qsrc, where, f"image_id {image_id} but its annotation ({ann_where}) says {ann_image}",
                                      reason="image_id differs from the annotation")
        values = {"image_id": image_id} if subtype is None else {"image_id": image_id, "data_subtype": subtype}
        img = fmt(values, qsrc, where)
        return _Item(str(qid), text, [img], extra, qsrc, where)

    items = list(_guard(report, parse, enumerate(qlist)))
    if anns:  # annotations of questions that the questions file does not have
        qid, (_, _, ann_where) = next(iter(anns.items()))
        err = DataFormatError(os.fspath(annotations), f"{ann_where} (question_id {qid})",
                              f"question_id {qid} is not in {qsrc}", reason="annotation without question")
        if not skip_bad:
            raise err
        report.skip(err.reason, n=len(anns), example=str(err))
    _run(items, report, out=out, tokenizer=tokenizer, max_text_len=max_text_len,
         region_store=region_store, overwrite=overwrite)
    if vocab is not None:  # labels mean nothing without it, so it travels with the store
        save_answer_vocab(vocab, os.path.join(os.fspath(out), VQA_VOCAB_FILE))
    return report


# --------------------------------------------------------------------------- NLVR2

NLVR2_IMG_FIELDS = ("name",)


def nlvr2_image_names(identifier: str) -> tuple[str, str]:
    """``"dev-850-0-0"`` -> ``("dev-850-0-img0", "dev-850-0-img1")``."""
    parts = identifier.rsplit("-", 3)
    if len(parts) != 4 or not all(parts) or not all(p.isdigit() for p in parts[1:]):
        raise ValueError(f"identifier {identifier!r} is not <split>-<set>-<pair>-<sentence>")
    stem = "-".join(parts[:3])
    return f"{stem}-img0", f"{stem}-img1"


def import_nlvr2(jsonl: str | os.PathLike, *, out: str | os.PathLike,
                 img_id_format: str | Callable[[dict], str] = "{name}", tokenizer: Any = None,
                 skip_bad: bool = False, max_text_len: int | None = None, region_store: Any = None,
                 overwrite: bool = False) -> TaskImportReport:
    """NLVR2 JSONL -> text store. img_id field: ``name`` (e.g. "dev-850-0-img0")."""
    report = TaskImportReport("nlvr2", skip_bad=skip_bad)
    _check_out(out, overwrite)
    fmt = _ImgIdFormat(img_id_format, NLVR2_IMG_FIELDS)
    src = os.fspath(jsonl)

    def parse(lineno: int, rec: Any) -> _Item:
        where = f"line {lineno}"
        ident = require(rec, "identifier", str, src, where)
        where = f"line {lineno} (identifier {ident})"
        sentence = require(rec, "sentence", str, src, where)
        label = require(rec, "label", str, src, where)
        if label not in NLVR2_LABELS:
            raise DataFormatError(src, where, f"label {label!r} is not 'True' or 'False'", reason="unknown label")
        try:
            left, right = nlvr2_image_names(ident)
        except ValueError as e:
            raise DataFormatError(src, where, str(e), reason="malformed identifier") from None
        imgs = [fmt({"name": left}, src, where), fmt({"name": right}, src, where)]
        extra = {"img_ids": imgs, "label": NLVR2_LABELS[label], "identifier": ident}
        return _Item(ident, sentence, imgs, extra, src, where)

    items = list(_guard(report, parse, iter_jsonl(src, report)))
    return _run(items, report, out=out, tokenizer=tokenizer, max_text_len=max_text_len,
                region_store=region_store, overwrite=overwrite)


# --------------------------------------------------------------------------- SNLI-VE

SNLI_VE_IMG_FIELDS = ("stem",)


def import_snli_ve(jsonl: str | os.PathLike, *, out: str | os.PathLike,
                   img_id_format: str | Callable[[dict], str] = "{stem}", tokenizer: Any = None,
                   skip_bad: bool = False, max_text_len: int | None = None, region_store: Any = None,
                   overwrite: bool = False) -> TaskImportReport:
    """SNLI-VE JSONL -> text store. img_id field: ``stem`` ("12345" for "12345.jpg")."""
    report = TaskImportReport("snli_ve", skip_bad=skip_bad)
    _check_out(out, overwrite)
    fmt = _ImgIdFormat(img_id_format, SNLI_VE_IMG_FIELDS)
    src = os.fspath(jsonl)
    label_of = {name: i for i, name in enumerate(SNLI_VE_LABELS)}

    def parse(lineno: int, rec: Any) -> _Item | None:
        where = f"line {lineno}"
        pair_id = require(rec, "pairID", str, src, where)
        where = f"line {lineno} (pairID {pair_id})"
        image = require(rec, "Flikr30kID", str, src, where)  # sic: the dataset's spelling
        hypothesis = require(rec, "sentence2", str, src, where)
        gold = require(rec, "gold_label", str, src, where)
        if gold == "-":
            report.skip("no gold label ('-': annotators disagreed)", example=f"{src}: {where}")
            return None
        if gold not in label_of:
            raise DataFormatError(src, where, f"gold_label {gold!r} is not one of {', '.join(SNLI_VE_LABELS)}",
                                  reason="unknown gold_label")
        stem = os.path.splitext(os.path.basename(image))[0]
        img = fmt({"stem": stem}, src, where)
        return _Item(pair_id, hypothesis, [img], {"label": label_of[gold], "pair_id": pair_id}, src, where)

    items = list(_guard(report, parse, iter_jsonl(src, report)))
    return _run(items, report, out=out, tokenizer=tokenizer, max_text_len=max_text_len,
                region_store=region_store, overwrite=overwrite)


# --------------------------------------------------------------------------- RefCOCO / + / g

REFCOCO_IMG_FIELDS = ("image_id", "file_stem")


class SafeUnpickler(pickle.Unpickler):
    """Reads pickles made of builtins only (dict, list, tuple, str, bytes, int, float, bool, None).

    Those need no global; every global a pickle names (a class, or a function such as
    ``os.system`` that a crafted ``__reduce__`` would call) is refused before it is looked up,
    so nothing in the file can run.
    """

    def __init__(self, file, *, source: str):
        # Python 2 pickles (the released refs files) hold byte strings: read them as UTF-8 text.
        super().__init__(file, encoding="utf-8")
        self.source = source

    def find_class(self, module: str, name: str):
        raise DataFormatError(self.source, None, f"refused global {module}.{name}: only plain data (dict, list, str, "
                                                 "int, float) is read from a pickle", reason="pickle names a global")

    def persistent_load(self, pid):
        raise DataFormatError(self.source, None, f"refused persistent id {pid!r}: only plain data is read from a pickle",
                              reason="pickle names a persistent object")


def load_plain_pickle(path: str | os.PathLike) -> Any:
    """A pickle of plain data, read with :class:`SafeUnpickler`; any problem names the file."""
    src = os.fspath(path)
    with open(src, "rb") as f:
        try:
            return SafeUnpickler(f, source=src).load()
        except DataFormatError:
            raise
        except (pickle.UnpicklingError, EOFError, UnicodeDecodeError, ValueError, TypeError, IndexError, KeyError,
                AttributeError) as e:
            truncated = isinstance(e, EOFError) or "truncated" in str(e)
            what = "truncated pickle" if truncated else "malformed pickle"
            raise DataFormatError(src, None, f"{what}: {type(e).__name__}: {e}", reason=what) from None


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def import_refcoco(refs: str | os.PathLike, instances: str | os.PathLike, *, out: str | os.PathLike,
                   splits: Sequence[str] | None = None,
                   img_id_format: str | Callable[[dict], str] = "{image_id}", tokenizer: Any = None,
                   skip_bad: bool = False, max_text_len: int | None = None, region_store: Any = None,
                   overwrite: bool = False) -> TaskImportReport:
    """RefCOCO-style ``refs(*).p`` + COCO ``instances.json`` -> text store, one record per sentence.

    ``splits`` keeps only refs of those splits (e.g. ``["val"]``; others are counted as left out).
    img_id fields: ``image_id`` (int), ``file_stem`` (the COCO file name without extension).
    """
    report = TaskImportReport("refcoco", skip_bad=skip_bad)
    _check_out(out, overwrite)
    fmt = _ImgIdFormat(img_id_format, REFCOCO_IMG_FIELDS)
    rsrc, isrc = os.fspath(refs), os.fspath(instances)
    ref_list = load_plain_pickle(rsrc)
    if not isinstance(ref_list, list):
        raise DataFormatError(rsrc, None, f"expected a list of refs, got {type(ref_list).__name__}", reason="wrong top-level type")
    inst = read_json(isrc, report)

    images: dict[int, tuple[float, float, str]] = {}
    for i, im in enumerate(_list_field(inst, "images", isrc)):
        try:
            where = f"images[{i}]"
            iid = require(im, "id", int, isrc, where)
            where = f"images[{i}] (id {iid})"
            w = require(im, "width", (int, float), isrc, where)
            h = require(im, "height", (int, float), isrc, where)
            fname = require(im, "file_name", str, isrc, where)
            if w <= 0 or h <= 0:
                raise DataFormatError(isrc, where, f"image size {w}x{h} is not positive", reason="bad image size")
        except DataFormatError as err:
            report.bad(err)
            continue
        images[iid] = (float(w), float(h), os.path.splitext(os.path.basename(fname))[0])
    boxes: dict[int, tuple[int, list[float]]] = {}
    for i, ann in enumerate(_list_field(inst, "annotations", isrc)):
        try:
            where = f"annotations[{i}]"
            aid = require(ann, "id", int, isrc, where)
            where = f"annotations[{i}] (id {aid})"
            iid = require(ann, "image_id", int, isrc, where)
            bbox = require(ann, "bbox", list, isrc, where)
            if len(bbox) != 4 or not all(_number(v) for v in bbox) or bbox[2] < 0 or bbox[3] < 0:
                raise DataFormatError(isrc, where, f"bbox {bbox!r:.80} is not [x, y, w, h] with w, h >= 0", reason="bad bbox")
        except DataFormatError as err:
            report.bad(err)
            continue
        boxes[aid] = (iid, [float(v) for v in bbox])

    wanted = set(splits) if splits is not None else None
    left_out: Counter = Counter()

    def parse_ref(i: int, ref: Any) -> list[_Item]:
        where = f"record {i}"
        ref_id = require(ref, "ref_id", int, rsrc, where)
        where = f"record {i} (ref_id {ref_id})"
        ann_id = require(ref, "ann_id", int, rsrc, where)
        image_id = require(ref, "image_id", int, rsrc, where)
        split = require(ref, "split", str, rsrc, where)
        category_id = require(ref, "category_id", int, rsrc, where)
        sentences = require(ref, "sentences", list, rsrc, where)
        if wanted is not None and split not in wanted:
            left_out[split] += len(sentences)
            return []
        if ann_id not in boxes:
            raise DataFormatError(rsrc, where, f"ann_id {ann_id} is not in {isrc}", reason="ann_id not in instances")
        ann_image, (x, y, w, h) = boxes[ann_id]
        if ann_image != image_id:
            raise DataFormatError(rsrc, where, f"ann_id {ann_id} belongs to image {ann_image} in {isrc}, not {image_id}",
                                  reason="ann_id on another image")
        if image_id not in images:
            raise DataFormatError(rsrc, where, f"image_id {image_id} is not in {isrc}", reason="image_id not in instances")
        width, height, stem = images[image_id]
        target = [x / width, y / height, (x + w) / width, (y + h) / height]
        img = fmt({"image_id": image_id, "file_stem": stem}, rsrc, where)
        out_items = []
        for j, s in enumerate(sentences):
            swhere = f"{where} sentences[{j}]"
            sent_id = require(s, "sent_id", int, rsrc, swhere)
            text = require(s, "sent", str, rsrc, f"{swhere} (sent_id {sent_id})")
            extra = {"ref_id": ref_id, "ann_id": ann_id, "target_box": target, "category_id": category_id, "split": split}
            out_items.append(_Item(str(sent_id), text, [img], extra, rsrc, f"{swhere} (sent_id {sent_id})"))
        return out_items

    items: list[_Item] = []
    for i, ref in enumerate(ref_list):
        try:
            items.extend(parse_ref(i, ref))
        except DataFormatError as err:
            report.bad(err)
    for split, n in sorted(left_out.items()):
        report.skip(f"sentence of split {split!r} (not in splits)", n=n)
    return _run(items, report, out=out, tokenizer=tokenizer, max_text_len=max_text_len,
                region_store=region_store, overwrite=overwrite)


# --------------------------------------------------------------------------- VCR

VCR_IMG_FIELDS = ("img_fn", "stem", "movie")
VCR_REF_STYLES = ("class", "name")


def _vcr_render(tokens: Any, objects: list[str], ref_style: str, src: str, where: str) -> tuple[str, list[tuple[int, int, int]]]:
    """Token list -> text, with the character span and index of every object it refers to."""
    if not isinstance(tokens, list) or not tokens:
        raise DataFormatError(src, where, f"expected a non-empty token list, got {tokens!r:.60}", reason="bad token list")
    parts: list[str] = []
    spans: list[tuple[int, int, int]] = []
    pos = 0

    def put(text: str, obj: int | None = None) -> None:
        nonlocal pos
        if parts:
            parts.append(" ")
            pos += 1
        if obj is not None:
            spans.append((pos, pos + len(text), obj))
        parts.append(text)
        pos += len(text)

    for k, tok in enumerate(tokens):
        if isinstance(tok, str):
            put(tok)
            continue
        if not isinstance(tok, list) or not tok or not all(isinstance(o, int) and not isinstance(o, bool) for o in tok):
            raise DataFormatError(src, where, f"token {k} is {tok!r:.40}: expected a word or a list of object indices",
                                  reason="bad token")
        for m, o in enumerate(tok):
            if not 0 <= o < len(objects):
                raise DataFormatError(src, where, f"token {k} refers to object {o} but there are {len(objects)} objects",
                                      reason="object reference out of range")
            if m:
                put("and")
            cls = objects[o]
            if ref_style == "name" and cls == "person":
                name = VCR_PERSON_NAMES[o % len(VCR_PERSON_NAMES)]
            else:
                name = cls
            put(name, o)
    return "".join(parts), spans


def _token_spans(offsets: Sequence[tuple[int, int]], spans: list[tuple[int, int, int]]) -> list[list[int]]:
    out = []
    for cs, ce, obj in spans:
        toks = [t for t, (a, b) in enumerate(offsets) if b > a and a >= cs and b <= ce]
        if toks:  # a class name the tokenizer drops entirely leaves no span to point at
            out.append([toks[0], toks[-1] + 1, obj])
    return out


def import_vcr(jsonl: str | os.PathLike, *, out: str | os.PathLike, ref_style: str = "class",
               img_id_format: str | Callable[[dict], str] = "{stem}", tokenizer: Any = None,
               skip_bad: bool = False, max_text_len: int | None = None, region_store: Any = None,
               overwrite: bool = False) -> TaskImportReport:
    """VCR JSONL -> text store, one record per question.

    img_id fields: ``img_fn`` (as written), ``stem`` (img_fn without its extension), ``movie``.
    """
    if ref_style not in VCR_REF_STYLES:
        raise ValueError(f"ref_style: {ref_style!r} is not one of {', '.join(VCR_REF_STYLES)}")
    report = TaskImportReport("vcr", skip_bad=skip_bad)
    _check_out(out, overwrite)
    fmt = _ImgIdFormat(img_id_format, VCR_IMG_FIELDS)
    src = os.fspath(jsonl)
    encoder = _encoder(tokenizer)
    tok = encoder.tokenizer

    def encode(texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        enc = tok(texts, add_special_tokens=False, return_offsets_mapping=True)
        return list(zip(enc["input_ids"], enc["offset_mapping"]))

    def parse(lineno: int, rec: Any) -> _Item:
        where = f"line {lineno}"
        annot_id = require(rec, "annot_id", str, src, where)
        where = f"line {lineno} (annot_id {annot_id})"
        objects = require(rec, "objects", list, src, where)
        if not all(isinstance(o, str) for o in objects):
            raise DataFormatError(src, where, "field 'objects' should be a list of class names", reason="field 'objects' has the wrong type")
        img_fn = require(rec, "img_fn", str, src, where)
        movie = rec.get("movie")  # absent -> an img_id_format that uses it fails, naming the record
        question = require(rec, "question", list, src, where)
        answers = require(rec, "answer_choices", list, src, where)
        rationales = require(rec, "rationale_choices", list, src, where)
        labels = {}
        for key, choices in (("answer_label", answers), ("rationale_label", rationales)):
            if not choices:
                raise DataFormatError(src, where, f"no {key.split('_')[0]} choices", reason="no choices")
            if key in rec:  # absent on the test split
                lab = require(rec, key, int, src, where)
                if not 0 <= lab < len(choices):
                    raise DataFormatError(src, where, f"{key} {lab} is not in 0..{len(choices) - 1}", reason=f"{key} out of range")
                labels[key] = lab
        q_text, q_spans = _vcr_render(question, objects, ref_style, src, f"{where} question")
        a_r = [_vcr_render(c, objects, ref_style, src, f"{where} answer_choices[{j}]") for j, c in enumerate(answers)]
        r_r = [_vcr_render(c, objects, ref_style, src, f"{where} rationale_choices[{j}]") for j, c in enumerate(rationales)]
        encoded = encode([q_text] + [t for t, _ in a_r] + [t for t, _ in r_r])
        (q_ids, q_off), a_enc, r_enc = encoded[0], encoded[1:1 + len(a_r)], encoded[1 + len(a_r):]
        stem = os.path.splitext(img_fn)[0]
        values = {"img_fn": img_fn, "stem": stem} | ({} if movie is None else {"movie": movie})
        img = fmt(values, src, where)
        extra: dict[str, Any] = {
            "answer_choices": [list(ids) for ids, _ in a_enc],
            "rationale_choices": [list(ids) for ids, _ in r_enc],
            **labels,
            "objects": list(objects),
            "object_refs": _token_spans(q_off, q_spans),
            "answer_refs": [_token_spans(off, sp) for (_, off), (_, sp) in zip(a_enc, a_r)],
            "rationale_refs": [_token_spans(off, sp) for (_, off), (_, sp) in zip(r_enc, r_r)],
        }
        return _Item(annot_id, q_text, [img], extra, src, where, token_ids=list(q_ids))

    items = list(_guard(report, parse, iter_jsonl(src, report)))
    return _run(items, report, out=out, tokenizer=encoder, max_text_len=max_text_len,
                region_store=region_store, overwrite=overwrite)


# --------------------------------------------------------------------------- command line


def _add_args(p: argparse.ArgumentParser, *, img_default: str, fields: Sequence[str]) -> None:
    add_common_args(p, text=True)
    p.add_argument("--region-store", default=None, help="region store whose image ids every record must name")
    p.add_argument("--img-id-format", default=img_default,
                   help=f"image id template (str.format) over the fields: {', '.join(fields)} (default {img_default!r})")


def _common_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    tokenizer = None
    if args.tokenizer:
        from vlframe.data.tokenizer import build_tokenizer

        tokenizer = TextEncoder(build_tokenizer(args.tokenizer), tokenizer_name=args.tokenizer)
    return {"out": args.out, "overwrite": args.overwrite, "skip_bad": args.skip_bad, "max_text_len": args.max_text_len,
            "tokenizer": tokenizer, "region_store": args.region_store, "img_id_format": args.img_id_format}


def _finish(report: TaskImportReport) -> TaskImportReport:
    print(report.summary())
    return report


def _cli_vqa(args: argparse.Namespace) -> TaskImportReport:
    return _finish(import_vqa(args.questions, args.annotations, answer_vocab=args.answer_vocab,
                              vocab_annotations=args.vocab_from, min_answer_count=args.min_answer_count,
                              answer_vocab_out=args.answer_vocab_out, **_common_kwargs(args)))


def _cli_nlvr2(args: argparse.Namespace) -> TaskImportReport:
    return _finish(import_nlvr2(args.jsonl, **_common_kwargs(args)))


def _cli_snli_ve(args: argparse.Namespace) -> TaskImportReport:
    return _finish(import_snli_ve(args.jsonl, **_common_kwargs(args)))


def _cli_refcoco(args: argparse.Namespace) -> TaskImportReport:
    return _finish(import_refcoco(args.refs, args.instances, splits=args.splits, **_common_kwargs(args)))


def _cli_vcr(args: argparse.Namespace) -> TaskImportReport:
    return _finish(import_vcr(args.jsonl, ref_style=args.ref_style, **_common_kwargs(args)))


def register_cli(subparsers: Any) -> None:
    """Add the ``vqa``, ``nlvr2``, ``snli_ve``, ``refcoco`` and ``vcr`` subcommands (``args.func(args)`` runs one)."""
    p = subparsers.add_parser("vqa", help="VQA v2 questions (+ annotations) -> text store")
    p.add_argument("--questions", required=True, help="v2_OpenEnded_mscoco_<split>_questions.json")
    p.add_argument("--annotations", default=None, help="v2_mscoco_<split>_annotations.json (absent for test)")
    p.add_argument("--answer-vocab", default=None, help="vocabulary file: one answer per line, JSON list or {answer: label}")
    p.add_argument("--vocab-from", nargs="+", default=None,
                   help="annotation files (train and val) to build the vocabulary from when --answer-vocab is not given")
    p.add_argument("--min-answer-count", type=int, default=9, help="keep answers seen at least this often (default 9)")
    p.add_argument("--answer-vocab-out", default=None, help="write the vocabulary used here (JSON list)")
    _add_args(p, img_default="{image_id}", fields=VQA_IMG_FIELDS)
    p.set_defaults(func=_cli_vqa)

    p = subparsers.add_parser("nlvr2", help="NLVR2 JSONL -> text store")
    p.add_argument("--jsonl", required=True, help="train.json / dev.json / test1.json (one object per line)")
    _add_args(p, img_default="{name}", fields=NLVR2_IMG_FIELDS)
    p.set_defaults(func=_cli_nlvr2)

    p = subparsers.add_parser("snli_ve", help="SNLI-VE JSONL -> text store")
    p.add_argument("--jsonl", required=True, help="snli_ve_<split>.jsonl")
    _add_args(p, img_default="{stem}", fields=SNLI_VE_IMG_FIELDS)
    p.set_defaults(func=_cli_snli_ve)

    p = subparsers.add_parser("refcoco", help="RefCOCO / RefCOCO+ / RefCOCOg refs pickle + instances.json -> text store")
    p.add_argument("--refs", required=True, help="refs(unc).p or refs(umd).p")
    p.add_argument("--instances", required=True, help="the dataset's instances.json (COCO format)")
    p.add_argument("--splits", nargs="+", default=None, help="keep only these splits (e.g. train, or testA testB)")
    _add_args(p, img_default="{image_id}", fields=REFCOCO_IMG_FIELDS)
    p.set_defaults(func=_cli_refcoco)

    p = subparsers.add_parser("vcr", help="VCR JSONL -> text store")
    p.add_argument("--jsonl", required=True, help="train.jsonl / val.jsonl / test.jsonl")
    p.add_argument("--ref-style", choices=VCR_REF_STYLES, default="class",
                   help="object references as class names, or people as gender-neutral names")
    _add_args(p, img_default="{stem}", fields=VCR_IMG_FIELDS)
    p.set_defaults(func=_cli_vcr)
