"""Datasets over the stores: one text paired with its image's regions.

``ImageTextDataset`` ("image_text") reads a region store and one or more text stores;
``SyntheticPairs`` ("synthetic") makes sure the synthetic world exists (see
:mod:`vlframe.data.synthetic`) and reads one of its domain/split text stores. Both return
:class:`vlframe.data.batch.Example` and know every example's length (text tokens incl. CLS/SEP
after truncation + selected regions) without decoding anything, for token-budget sampling.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from vlframe.data.batch import Example
from vlframe.data.stores import RegionStore, TextStore
from vlframe.registry import DATASETS

__all__ = ["ImageTextDataset", "SyntheticPairs"]

logger = logging.getLogger(__name__)


@DATASETS.register_module(name="image_text")
class ImageTextDataset(Dataset):
    """Texts of ``text_store`` (a path, or a list of paths read as one) with their images' regions.

    ``input_ids`` = [CLS] + token ids + [SEP], truncated to ``max_text_len`` (SEP kept); the number
    of truncated texts is logged once and kept in ``num_truncated``. Region selection
    (``conf_threshold``, ``min_regions``, ``max_regions``, ``fixed_regions``) is the region
    store's; ``feat_dim``, when given, must match the store. ``txt_ids`` picks a subset.
    """

    def __init__(self, *, region_store: str, text_store: str | Sequence[str], max_text_len: int = 60,
                 conf_threshold: float | None = 0.2, min_regions: int = 10, max_regions: int = 100,
                 fixed_regions: int | None = None, feat_dim: int | None = None,
                 txt_ids: Sequence[str] | None = None, text_only: bool = False):
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
        self._txt_ids = ids
        self._store_of = np.array([owner[tid] for tid in ids], dtype=np.int16)
        img_ids = []
        for tid, s in zip(ids, self._store_of):
            img = self.texts[s].txt2img.get(tid)
            if img is None:
                raise ValueError(f"image_text dataset: text store {self.texts[s].path}: txt_id {tid!r} has no image")
            if img not in self.regions:
                raise ValueError(f"image_text dataset: text store {self.texts[s].path}: txt_id {tid!r} refers to "
                                 f"img_id {img!r}, which is not in region store {self.regions.path}")
            img_ids.append(img)
        self._img_ids = img_ids
        raw_len = np.array([self.texts[s].id2len[tid] for tid, s in zip(ids, self._store_of)], dtype=np.int64)
        self._text_len = np.minimum(raw_len + 2, self.max_text_len)
        self.num_truncated = int((raw_len + 2 > self.max_text_len).sum())
        if self.num_truncated:
            logger.warning("image_text dataset (%s): %d of %d texts are longer than max_text_len=%d and are "
                           "truncated", ", ".join(paths), self.num_truncated, len(ids), self.max_text_len)
        per_image = {img: self.regions.num_regions(img) for img in set(img_ids)}
        self._region_len = np.array([per_image[img] for img in img_ids], dtype=np.int64)
        # text_only: every example comes with zero regions (text-only MLM, the paper's Table 2 L2).
        self.text_only = bool(text_only)
        if self.text_only:
            self._region_len[:] = 0
        special = first.special_ids
        self._cls, self._sep = int(special["cls"]), int(special["sep"])

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
        """(img_feat float32 [K, D], img_pos float32 [K, 7], soft_labels float32 [K, C] or None)."""
        if self.text_only:
            c = self.regions.num_labels
            return torch.zeros(0, self.feat_dim), torch.zeros(0, 7), None if c is None else torch.zeros(0, c)
        r = self.regions.get(img_id)
        feat = torch.from_numpy(r.features.astype(np.float32))
        pos = torch.from_numpy(np.array(r.boxes, dtype=np.float32))  # copy: store buffers are read-only
        soft = None if r.soft_labels is None else torch.from_numpy(r.soft_labels.astype(np.float32, copy=True))
        return feat, pos, soft

    def _text(self, i: int):
        rec = self.texts[self._store_of[i]].get(self._txt_ids[i])
        body = rec.token_ids[: self.max_text_len - 2].astype(np.int64)
        return rec, torch.from_numpy(np.concatenate([[self._cls], body, [self._sep]]))

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
    """A split/domain of the synthetic world, generated under ``cache_dir`` on first use.

    ``split``: "train" | "val"; ``domain``: "in" | "out" | "all" (both). World kwargs
    (``seed``, ``num_images``, ``val_fraction``, ``captions_per_image``, ... see
    :func:`vlframe.data.synthetic.generate_world`) select the world; ``feat_dim`` is both the
    world's feature dimension and the dimension checked on reading.
    """

    def __init__(self, *, cache_dir: str = ".cache/vlframe", split: str = "train", domain: str = "in",
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
