"""Datasets over the stores: one text paired with its image's regions.

``ImageTextDataset`` ("image_text") reads a region store and one or more text stores;
``SyntheticPairs`` ("synthetic") makes sure the synthetic world exists (see
:mod:`vlframe.data.synthetic`) and reads one of its domain/split text stores. Both return
:class:`vlframe.data.batch.Example` and know every example's length (text tokens incl. CLS/SEP
after truncation + selected regions) without decoding anything, for token-budget sampling.

Read path. An example's features, boxes and soft labels are read-only views of the LMDB record
in their stored dtype (fp16 features): nothing is converted or copied here; ``collate`` copies
them once into the padded batch (see :mod:`vlframe.data.batch`). ``soft_labels=False`` does not
read the detector soft labels at all (``[K, 1601]`` fp16 is more bytes than the features; only
the MRC tasks use them).

Data quality (docs/data.md has the full table):

* Text longer than ``max_text_len``: truncated (SEP kept); the number of truncated texts is
  logged once per dataset (a warning) and kept in ``num_truncated``.
* An empty text, or an image with zero regions (none stored, or none selected because
  ``min_regions=0`` and no region passes ``conf_threshold``): found from the stores' meta at
  construction, nothing decoded. Default: :class:`~vlframe.data.stores.DataQualityError` naming
  the store, the text and image ids and how many such examples there are. ``skip_bad=True``: those
  examples are dropped, with one logged count per reason, kept in ``skipped``.
  (``text_only`` datasets read no regions, so zero-region images are fine there.)
* NaN/inf features (or boxes): only visible when the record is decoded, so
  ``__getitem__`` raises :class:`~vlframe.data.stores.DataQualityError` naming the region store
  and the image id, in both modes - dropping an example mid-epoch would change batches the sampler
  has already planned. Soft labels are checked where a batch copies them (``collate``, or only the
  masked rows in ``gather_masked_soft_labels``), raising the same error naming the image id. The writers and importers never produce such records; a store that has
  them was written elsewhere or is damaged, and is rewritten (importers skip bad images with a
  count under ``--skip-bad``).
"""
from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from vlframe.data.batch import Example
from vlframe.data.stores import DataQualityError, RegionStore, TextStore
from vlframe.registry import DATASETS

__all__ = ["ImageTextDataset", "SyntheticPairs"]

logger = logging.getLogger(__name__)


_READONLY_WARNING_SEEN = False


def _view(a: np.ndarray) -> torch.Tensor:
    """A tensor sharing ``a``'s memory. Record arrays are read-only views of msgpack's bytes;
    torch warns (once per process) that it cannot protect them - nothing writes to them (collate
    copies), so that one warning is silenced here, and later calls skip the filter's cost."""
    global _READONLY_WARNING_SEEN
    if a.flags.writeable or _READONLY_WARNING_SEEN:
        return torch.from_numpy(a)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(a)
    _READONLY_WARNING_SEEN = True
    return t


@DATASETS.register_module(name="image_text")
class ImageTextDataset(Dataset):
    """Texts of ``text_store`` (a path, or a list of paths read as one) with their images' regions.

    ``input_ids`` = [CLS] + token ids + [SEP], truncated to ``max_text_len`` (SEP kept); the number
    of truncated texts is logged once and kept in ``num_truncated``. Region selection
    (``conf_threshold``, ``min_regions``, ``max_regions``, ``fixed_regions``) is the region
    store's; ``feat_dim``, when given, must match the store. ``txt_ids`` picks a subset.
    ``soft_labels=False`` leaves ``Example.soft_labels`` None (not read). ``skip_bad`` drops
    examples with an empty text or an image without regions instead of raising (module docstring).
    """

    # Keyword arguments that name folders which must exist before a run starts (checked on the
    # submitting host by vlframe.launch.check_data_paths, so a typo never waits in a queue).
    path_kwargs: tuple[str, ...] = ("region_store", "text_store")

    def __init__(self, *, region_store: str, text_store: str | Sequence[str], max_text_len: int = 60,
                 conf_threshold: float | None = 0.2, min_regions: int = 10, max_regions: int = 100,
                 fixed_regions: int | None = None, feat_dim: int | None = None,
                 txt_ids: Sequence[str] | None = None, text_only: bool = False, soft_labels: bool = True,
                 skip_bad: bool = False):
        if int(max_text_len) < 3:
            raise ValueError(f"image_text dataset: max_text_len must be >= 3 (CLS + 1 token + SEP), got {max_text_len}")
        self.max_text_len = int(max_text_len)
        self.regions = RegionStore(region_store, conf_threshold=conf_threshold, min_regions=min_regions,
                                   max_regions=max_regions, fixed_regions=fixed_regions, expect_feat_dim=feat_dim)
        paths = [text_store] if isinstance(text_store, (str, os.PathLike)) else list(text_store)
        if not paths:
            raise ValueError("image_text dataset: text_store is an empty list")
        self.texts = [TextStore(p) for p in paths]
        first = self.texts[0]
        for t in self.texts[1:]:
            if t.special_ids != first.special_ids or t.vocab_size != first.vocab_size:
                raise ValueError(f"image_text dataset: text stores {first.path} and {t.path} use different "
                                 f"tokenizers (special ids / vocabulary size differ)")
        # text_only: every example comes with zero regions (text-only MLM, the paper's Table 2 L2).
        self.text_only = bool(text_only)
        self.read_soft_labels = bool(soft_labels)

        owner: dict[str, int] = {}
        for s, t in enumerate(self.texts):
            for tid in t.ids():
                if tid in owner:
                    raise ValueError(f"image_text dataset: txt_id {tid!r} is in both {self.texts[owner[tid]].path} "
                                     f"and {t.path}")
                owner[tid] = s
        if txt_ids is None:
            ids = [tid for t in self.texts for tid in t.ids()]
        else:
            ids = list(txt_ids)
            unknown = [tid for tid in ids if tid not in owner]
            if unknown:
                raise KeyError(f"image_text dataset: txt_ids {unknown[:5]} not in text store(s) {paths}")
        store_of = np.array([owner[tid] for tid in ids], dtype=np.int16)
        img_ids = []
        for tid, s in zip(ids, store_of):
            img = self.texts[s].txt2img.get(tid)
            if img is None:
                raise ValueError(f"image_text dataset: text store {self.texts[s].path}: txt_id {tid!r} has no image")
            if img not in self.regions:
                raise ValueError(f"image_text dataset: text store {self.texts[s].path}: txt_id {tid!r} refers to "
                                 f"img_id {img!r}, which is not in region store {self.regions.path}")
            img_ids.append(img)
        raw_len = np.array([self.texts[s].id2len[tid] for tid, s in zip(ids, store_of)], dtype=np.int64)
        per_image = {img: self.regions.num_regions(img) for img in set(img_ids)}
        region_len = np.array([per_image[img] for img in img_ids], dtype=np.int64)
        if self.text_only:
            region_len[:] = 0

        keep = self._check_quality(ids, store_of, img_ids, raw_len, region_len, skip_bad=bool(skip_bad))
        if not keep.all():
            ids = [tid for tid, k in zip(ids, keep) if k]
            img_ids = [img for img, k in zip(img_ids, keep) if k]
            store_of, raw_len, region_len = store_of[keep], raw_len[keep], region_len[keep]
            if not ids:
                raise ValueError(f"image_text dataset: no example left after skip_bad dropped {self.skipped} "
                                 f"(text store(s) {paths}, region store {self.regions.path})")
        self._txt_ids = ids
        self._store_of = store_of
        self._img_ids = img_ids
        self._region_len = region_len
        self._text_len = np.minimum(raw_len + 2, self.max_text_len)
        self.num_truncated = int((raw_len + 2 > self.max_text_len).sum())
        if self.num_truncated:
            logger.warning("image_text dataset (%s): %d of %d texts are longer than max_text_len=%d and are "
                           "truncated", ", ".join(map(str, paths)), self.num_truncated, len(ids), self.max_text_len)
        special = first.special_ids
        self._cls, self._sep = int(special["cls"]), int(special["sep"])

    def _check_quality(self, ids: list[str], store_of: np.ndarray, img_ids: list[str], raw_len: np.ndarray,
                       region_len: np.ndarray, *, skip_bad: bool) -> np.ndarray:
        """Examples to keep; raises on the first bad one unless ``skip_bad`` (see module docstring)."""
        reasons = {
            "empty_text": raw_len == 0,
            # zero regions after selection; text_only reads no regions, so none are needed
            "zero_regions": (region_len == 0) & (raw_len > 0) if not self.text_only else np.zeros(len(ids), bool),
        }
        self.skipped = {r: int(m.sum()) for r, m in reasons.items() if m.any()}
        if not self.skipped:
            return np.ones(len(ids), dtype=bool)
        if not skip_bad:
            reason = next(iter(self.skipped))
            j = int(np.flatnonzero(reasons[reason])[0])
            tid, img, n = ids[j], img_ids[j], self.skipped[reason]
            if reason == "empty_text":
                path, key = self.texts[store_of[j]].path, tid
                what = f"text store {path}: txt_id {tid!r} is an empty text (no tokens); {n} empty text(s)"
            else:
                path, key, stored = self.regions.path, img, self.regions.num_stored(img)
                cause = ("has no regions" if stored == 0 else
                         f"has no region selected (0 of {stored} pass conf_threshold={self.regions.conf_threshold} "
                         f"with min_regions={self.regions.min_regions})")
                what = f"region store {path}: img_id {img!r} (of txt_id {tid!r}) {cause}; {n} such example(s)"
            raise DataQualityError(f"image_text dataset: {what} in all (skip_bad=True drops them with a count "
                                   f"in the log)", path=path, key=key, reason=reason)
        for reason, n in self.skipped.items():
            where = (f"region store {self.regions.path}" if reason == "zero_regions" else
                     "text store " + ", ".join(sorted({self.texts[s].path for s in store_of[reasons[reason]]})))
            logger.warning("image_text dataset (%s): skip_bad: dropped %d of %d examples (%s)",
                           where, n, len(ids), reason.replace("_", " "))
        bad = np.zeros(len(ids), dtype=bool)
        for m in reasons.values():
            bad |= m
        return ~bad

    # -- sizes, ids ----------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._txt_ids)

    @property
    def txt_ids(self) -> list[str]:
        return list(self._txt_ids)

    @property
    def img_ids(self) -> list[str]:
        """Image of each example, in example order."""
        return list(self._img_ids)

    @property
    def special_ids(self) -> dict[str, int]:
        return self.texts[0].special_ids

    @property
    def vocab_size(self) -> int:
        return self.texts[0].vocab_size

    @property
    def feat_dim(self) -> int:
        return self.regions.feat_dim

    @property
    def num_labels(self) -> int | None:
        return self.regions.num_labels

    def text_lengths(self) -> np.ndarray:
        """Tokens per example incl. CLS/SEP, after truncation."""
        return self._text_len.copy()

    def region_lengths(self) -> np.ndarray:
        """Selected regions per example (from the store's meta; nothing is decoded)."""
        return self._region_len.copy()

    def lengths(self) -> np.ndarray:
        """Input units per example: ``text_lengths() + region_lengths()``."""
        return self._text_len + self._region_len

    def image_ids(self) -> list[str]:
        """Sorted unique images of this dataset."""
        return sorted(set(self._img_ids))

    # -- reading -------------------------------------------------------------------------------

    def image_example(self, img_id: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(img_feat [K, D] fp16 as stored, img_pos float32 [K, 7], soft_labels [K, C] as stored or
        None): read-only views of the record (never modify them in place; collate copies).
        Raises :class:`~vlframe.data.stores.DataQualityError` on NaN/inf in the record (soft labels:
        when a batch copies them, see the module docstring)."""
        c = self.regions.num_labels
        if self.text_only:
            soft = torch.zeros(0, c, dtype=torch.float16) if c is not None and self.read_soft_labels else None
            return torch.zeros(0, self.feat_dim, dtype=torch.float16), torch.zeros(0, 7), soft
        # soft labels are checked for NaN/inf where a batch copies them, only the rows it copies
        # (vlframe.data.batch): MRC uses the masked ~15%, and reading is what costs
        r = self.regions.get(img_id, soft_labels=self.read_soft_labels, check_soft_labels=False)
        soft = None if r.soft_labels is None else _view(r.soft_labels)
        return _view(r.features), _view(r.boxes), soft

    def _text(self, i: int):
        rec = self.texts[self._store_of[i]].get(self._txt_ids[i])
        body = rec.token_ids[: self.max_text_len - 2]
        ids = torch.empty(body.shape[0] + 2, dtype=torch.long)
        ids[0], ids[-1] = self._cls, self._sep
        ids[1:-1] = _view(body)
        return rec, ids

    def text_ids(self, i: int) -> torch.Tensor:
        """[CLS] + ids + [SEP] of example ``i`` (truncated), without reading its regions."""
        return self._text(i)[1]

    def __getitem__(self, i: int) -> Example:
        if not -len(self) <= i < len(self):
            raise IndexError(f"image_text dataset: index {i} out of range for {len(self)} examples")
        i = int(i) % len(self)
        rec, input_ids = self._text(i)
        feat, pos, soft = self.image_example(self._img_ids[i])
        return Example(txt_id=rec.txt_id, img_id=self._img_ids[i], input_ids=input_ids, img_feat=feat, img_pos=pos,
                       soft_labels=soft, extra=dict(rec.extra))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(examples={len(self)}, images={len(set(self._img_ids))}, "
                f"regions={self.regions.path!r})")


@DATASETS.register_module(name="synthetic")
class SyntheticPairs(ImageTextDataset):
    """A split/domain of the synthetic world, generated under ``cache_dir`` on first use (None:
    the per-user cache, ``$XDG_CACHE_HOME/vlframe`` or ``~/.cache/vlframe``).

    ``split``: "train" | "val"; ``domain``: "in" | "out" | "all" (both). World kwargs
    (``seed``, ``num_images``, ``val_fraction``, ``captions_per_image``, ... see
    :func:`vlframe.data.synthetic.generate_world`) select the world; ``feat_dim`` is both the
    world's feature dimension and the dimension checked on reading.
    """

    path_kwargs: tuple[str, ...] = ()  # cache_dir is created and filled on first use

    def __init__(self, *, cache_dir: str | None = None, split: str = "train", domain: str = "in",
                 seed: int = 0, num_images: int = 2000, val_fraction: float = 0.1, feat_dim: int = 256,
                 captions_per_image: int = 5, domains: Sequence[str] = ("in", "out"), out_fraction: float = 0.3,
                 regions_range: Sequence[int] = (10, 40), dup_prob: float = 0.5,
                 max_text_len: int = 60, conf_threshold: float | None = 0.2, min_regions: int = 10,
                 max_regions: int = 100, fixed_regions: int | None = None, txt_ids: Sequence[str] | None = None,
                 text_only: bool = False):
        from vlframe.data.synthetic import ensure_world

        if split not in ("train", "val"):
            raise ValueError(f"synthetic dataset: split must be 'train' or 'val', got {split!r}")
        if domain not in ("in", "out", "all"):
            raise ValueError(f"synthetic dataset: domain must be 'in', 'out' or 'all', got {domain!r}")
        wanted = list(domains) if domain == "all" else [domain]
        missing = [d for d in wanted if d not in domains]
        if missing:
            raise ValueError(f"synthetic dataset: domain {domain!r} asks for {missing}, but the world is generated "
                             f"with domains={list(domains)}")
        self.world_dir = ensure_world(cache_dir, seed=seed, num_images=num_images, val_fraction=val_fraction,
                                      feat_dim=feat_dim, captions_per_image=captions_per_image,
                                      domains=tuple(domains), out_fraction=out_fraction,
                                      regions_range=tuple(regions_range), dup_prob=dup_prob)
        self.split, self.domain = split, domain
        super().__init__(region_store=os.path.join(self.world_dir, "regions"),
                         text_store=[os.path.join(self.world_dir, "texts", f"{d}_{split}") for d in wanted],
                         max_text_len=max_text_len, conf_threshold=conf_threshold, min_regions=min_regions,
                         max_regions=max_regions, fixed_regions=fixed_regions, feat_dim=feat_dim, txt_ids=txt_ids,
                         text_only=text_only)

    def scenes(self) -> dict[str, dict[str, Any]]:
        """img_id -> hidden scene of this dataset's images (read from the world's scenes.jsonl)."""
        from vlframe.data.synthetic import load_scenes

        mine = set(self._img_ids)
        return {k: v for k, v in load_scenes(self.world_dir).items() if k in mine}
