"""Caption datasets in Karpathy's split files -> one vlframe text store per split.

``dataset_coco.json`` / ``dataset_flickr30k.json``::

    {"dataset": "coco" | "flickr30k",
     "images": [{"filename", "filepath" (COCO only), "cocoid" (COCO only), "imgid", "split"
                 (train/val/test/restval), "sentids", "sentences": [{"raw", "tokens", "sentid",
                 "imgid"}]}]}

Text id = ``sentid``; ``img_id`` = the region store's key for the image, built from a template
over the image's fields (``{cocoid}``, ``{imgid}``, ``{filename}``, ``{stem}`` = filename without
extension, ``{stem_lower}``, ``{filepath}``), e.g. ``{cocoid}`` for bottom-up-attention TSVs of
COCO, ``{stem}`` for Flickr30K, ``{stem_lower}.npz`` for UNITER's COCO img_db names. Each
caption's ``raw`` text is tokenised once with our tokenizer; ``extra`` keeps the Karpathy split.
"""
from __future__ import annotations

import argparse
import os
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vlframe.data.importers.common import (DataFormatError, ImportReport, TextEncoder, add_common_args,
                                           check_max_text_len, count_too_long, encoder_from_args, read_json,
                                           region_store_ids, require)

KARPATHY_SPLITS = ("train", "restval", "val", "test")
IMG_ID_PRESETS = {"cocoid": "{cocoid}", "imgid": "{imgid}", "filename": "{filename}", "stem": "{stem}",
                  "stem_lower": "{stem_lower}"}
TEMPLATE_FIELDS = ("cocoid", "imgid", "filename", "stem", "stem_lower", "filepath")


@dataclass
class Caption:
    txt_id: str
    img_id: str
    raw: str
    split: str  # the Karpathy split as written in the file (restval kept apart here)


def _template(img_id: str) -> str:
    tmpl = IMG_ID_PRESETS.get(img_id, img_id)
    # Plain named fields only: no attribute or index access inside the braces.
    for _, name, spec, conv in string.Formatter().parse(tmpl):
        if name is None:
            continue
        if name not in TEMPLATE_FIELDS:
            raise ValueError(f"img_id template {tmpl!r}: unknown field {{{name}}}; known: "
                             f"{', '.join('{' + f + '}' for f in TEMPLATE_FIELDS)} (or a preset: {', '.join(IMG_ID_PRESETS)})")
    return tmpl


def read_karpathy(path: str | os.PathLike, *, img_id: str | None = None, report: ImportReport | None = None
                  ) -> tuple[str, list[Caption]]:
    """Parse a Karpathy split file -> (dataset name, captions in file order).

    ``img_id`` is a preset name or template (default: ``{cocoid}`` when the file is COCO, else
    ``{stem}``). A bad image or sentence raises naming the file and the image / sentence, or is
    counted and skipped under ``report.skip_bad``.
    """
    path = os.fspath(path)
    report = report or ImportReport(os.path.basename(path))
    data = read_json(path, report)
    if not isinstance(data, dict):
        raise DataFormatError(path, "top level", f"expected an object with 'images', got {type(data).__name__}",
                              reason="top level is not an object")
    images = require(data, "images", list, path, "top level")
    dataset = data.get("dataset", "")
    dataset = dataset if isinstance(dataset, str) else ""
    tmpl = _template(img_id or ("{cocoid}" if dataset == "coco" else "{stem}"))
    needed = {name for _, name, _, _ in string.Formatter().parse(tmpl) if name}
    out: list[Caption] = []
    seen_img: dict[str, int] = {}
    seen_sent: set[int] = set()
    for i, img in enumerate(images):
        where = f"image {i}"
        try:
            filename = require(img, "filename", str, path, where)
            where = f"image {i} ({filename})"
            split = require(img, "split", str, path, where)
            if split not in KARPATHY_SPLITS:
                raise DataFormatError(path, where, f"split {split!r} is not one of {list(KARPATHY_SPLITS)}",
                                      reason="unknown split")
            sentences = require(img, "sentences", list, path, where)
            fields: dict[str, Any] = {"filename": filename, "stem": os.path.splitext(filename)[0]}
            fields["stem_lower"] = fields["stem"].lower()
            for name, types in (("cocoid", int), ("imgid", int), ("filepath", str)):
                if name in needed:
                    fields[name] = require(img, name, types, path, where)
            key = tmpl.format(**fields)
            if key in seen_img:
                raise DataFormatError(path, where, f"img_id {key!r} already used by image {seen_img[key]}",
                                      reason="duplicate image id")
            caps = []
            for j, sent in enumerate(sentences):
                swhere = f"{where} sentence {j}"
                sentid = require(sent, "sentid", int, path, swhere)
                swhere = f"{where} sentence {j} (sentid {sentid})"
                raw = require(sent, "raw", str, path, swhere)
                if not raw.strip():
                    raise DataFormatError(path, swhere, "empty caption", reason="empty caption")
                if sentid in seen_sent or any(c.txt_id == str(sentid) for c in caps):
                    raise DataFormatError(path, swhere, "sentid used twice", reason="duplicate sentid")
                caps.append(Caption(str(sentid), key, raw, split))
        except DataFormatError as e:
            report.bad(e)
            continue
        seen_img[key] = i
        seen_sent.update(int(c.txt_id) for c in caps)
        out.extend(caps)
    return dataset, out


def import_karpathy(path: str | os.PathLike, out: str | os.PathLike, *, splits: Sequence[str] | None = None,
                    restval_into_train: bool = False, img_id: str | None = None,
                    region_store: str | os.PathLike | None = None, encoder: TextEncoder | None = None,
                    max_text_len: int | None = None, skip_bad: bool = False,
                    overwrite: bool = False) -> dict[str, ImportReport]:
    """Karpathy split file -> ``out/<split>/`` text stores; returns one report per written split.

    ``splits``: the Karpathy splits to write (default: every split present). ``restval_into_train``
    writes restval captions into the train store (then ``restval`` is not a split of its own).
    ``region_store``: every image must have features there; an image without raises naming the
    file and image, or (``skip_bad``) its captions are skipped and counted.
    """
    from vlframe.data.stores import TextStoreWriter

    path = os.fspath(path)
    out = os.fspath(out)
    parse_report = ImportReport(os.path.basename(path), skip_bad=skip_bad)
    _, captions = read_karpathy(path, img_id=img_id, report=parse_report)

    def target(split: str) -> str:
        return "train" if restval_into_train and split == "restval" else split

    present = list(dict.fromkeys(target(c.split) for c in captions))
    if splits is None:
        wanted = present
    else:
        wanted = list(dict.fromkeys(target(s) for s in splits))
        unknown = [s for s in wanted if s not in KARPATHY_SPLITS]
        if unknown:
            raise ValueError(f"splits: unknown split(s) {unknown}; Karpathy splits are {list(KARPATHY_SPLITS)}")
    empty = [s for s in wanted if s not in present]
    if empty:
        raise ValueError(f"{path}: no captions for split(s) {empty} (present: {present})")
    captions = [c for c in captions if target(c.split) in wanted]
    if region_store is not None:
        have = region_store_ids(region_store)
        per_image = Counter(c.img_id for c in captions)
        for key, n_caps in per_image.items():
            if key not in have:
                parse_report.bad(DataFormatError(path, f"image {key!r}",
                                                 f"has no features in region store {os.fspath(region_store)}",
                                                 reason="image has no features"))
                # The image's captions go with it; count them too.
                parse_report.skip("caption of an image without features", n=n_caps)
        captions = [c for c in captions if c.img_id in have]

    check_max_text_len(max_text_len)
    encoder = encoder or TextEncoder()
    store_kwargs = encoder.store_kwargs()
    reports: dict[str, ImportReport] = {}
    for split in wanted:
        caps = [c for c in captions if target(c.split) == split]
        report = ImportReport(f"{os.path.basename(path)} [{split}]", skip_bad=skip_bad)
        token_ids = encoder.encode_many([c.raw for c in caps])
        with TextStoreWriter(os.path.join(out, split), overwrite=overwrite, **store_kwargs) as w:
            for c, ids in zip(caps, token_ids):
                try:
                    w.add(c.txt_id, token_ids=ids, img_id=c.img_id, raw=c.raw, extra={"karpathy_split": c.split})
                except ValueError as e:
                    report.bad(DataFormatError(path, f"sentid {c.txt_id} (image {c.img_id!r})", str(e),
                                               reason="refused by the store"))
                    continue
                count_too_long(report, ids, max_text_len)
                report.wrote()
        reports[split] = report
    # Problems met while parsing belong to no single split: report them under their own name.
    if parse_report.total_skipped:
        reports["(parse)"] = parse_report
    return reports


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    for name, ds in (("coco_karpathy", "COCO"), ("flickr30k_karpathy", "Flickr30K")):
        p = subparsers.add_parser(name, help=f"{ds} captions (Karpathy split JSON) -> one text store per split")
        p.add_argument("input", help=f"Karpathy dataset_{'coco' if ds == 'COCO' else 'flickr30k'}.json")
        p.add_argument("--splits", default=None,
                       help="comma-separated Karpathy splits to write (default: all present)")
        p.add_argument("--restval-into-train", action="store_true", help="write restval captions into the train store")
        p.add_argument("--img-id", default="cocoid" if ds == "COCO" else "stem",
                       help=f"region-store key of an image: a preset ({', '.join(IMG_ID_PRESETS)}) or a template "
                            f"over {', '.join('{' + f + '}' for f in TEMPLATE_FIELDS)}")
        p.add_argument("--region-store", default=None, help="check that every image has features in this store")
        add_common_args(p, text=True)
        p.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> dict[str, ImportReport]:
    splits = [s.strip() for s in args.splits.split(",") if s.strip()] if args.splits else None
    reports = import_karpathy(args.input, args.out, splits=splits, restval_into_train=args.restval_into_train,
                              img_id=args.img_id, region_store=args.region_store, encoder=encoder_from_args(args),
                              max_text_len=args.max_text_len, skip_bad=args.skip_bad, overwrite=args.overwrite)
    for r in reports.values():
        print(r.summary())
    return reports
