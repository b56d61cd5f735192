"""Image-text retrieval: score every text against every image of a split, then recall@K."""
from __future__ import annotations

import json
import os
from typing import Any, Callable

import torch
import torch.distributed as dist

from vlframe.data.batch import Example, collate
from vlframe.io import atomic_write
from vlframe.metrics.base import DatasetMetric
from vlframe.registry import METRICS


def retrieval_recall(scores: torch.Tensor, txt2img: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """``scores`` [num_texts, num_images]; ``txt2img`` [num_texts] index of each text's image.

    ``ir_r{k}`` (image retrieval): a text's own image is among its top k images.
    ``tr_r{k}`` (text retrieval): at least one of an image's texts is among its top k texts.
    ``r_mean``: the mean of all six recalls, as the paper reports.
    """
    n_txt, n_img = scores.shape
    out: dict[str, float] = {}
    own = scores.gather(1, txt2img[:, None])  # [T, 1]
    # Rank of the correct image for each text = how many images score strictly higher.
    img_rank = (scores > own).sum(1)
    # For each image, the best rank among its texts in that image's column.
    col_rank = (scores[None, :, :] > scores[:, None, :]).sum(1)  # [T, I]: rank of text t in column i
    own_col_rank = col_rank.gather(1, txt2img[:, None]).squeeze(1)  # rank of text t in its image's column
    best_txt_rank = torch.full((n_img,), n_txt, dtype=torch.long)
    best_txt_rank.scatter_reduce_(0, txt2img, own_col_rank, reduce="amin")
    for k in ks:
        out[f"ir_r{k}"] = float((img_rank < k).float().mean())
        out[f"tr_r{k}"] = float((best_txt_rank < k).float().mean())
    out["r_mean"] = sum(out.values()) / len(out)
    return out


def score_all_pairs(
    score_fn: Callable[[Any, Any], torch.Tensor],
    model: Any,
    dataset: Any,
    *,
    device: torch.device,
    num_images: int | None = None,
    pairs_per_batch: int = 256,
    block_texts: int = 64,
    block_dir: str | None = None,
    fingerprint: str = "",
    rank: int = 0,
    world_size: int = 1,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores [texts, images] of every text of the first ``num_images`` images (None: all) against
    each of those images, and each text's image index.

    The texts are cut into blocks of ``block_texts``; block b is scored by rank ``b % world_size``
    (sharded over DDP ranks; the blocks are then gathered, so every rank returns the whole matrix).
    Within a block, the pairs are batched ``pairs_per_batch`` at a time with the images in order of
    their region count, so a batch holds images of similar size and pads little. With ``block_dir``
    each finished block is saved there (atomically) and a later call with the same
    ``fingerprint`` (what is evaluated: checkpoint, split) and sizes reuses it: an interrupted
    evaluation resumes where it stopped. ``progress``: a progress bar over this rank's blocks.
    """
    images = dataset.image_ids()
    if num_images:
        images = images[:num_images]
    img_index = {img: i for i, img in enumerate(images)}
    texts = [(i, img) for i, img in enumerate(dataset.img_ids) if img in img_index]  # (example, its image)
    txt2img = torch.tensor([img_index[img] for _, img in texts])
    regions = {img: dataset.image_example(img)[:2] for img in images}
    packed = sorted(range(len(images)), key=lambda j: regions[images[j]][0].shape[0])
    blocks = [texts[s : s + block_texts] for s in range(0, len(texts), block_texts)]
    if block_dir:
        _check_manifest(block_dir, {"fingerprint": fingerprint, "texts": len(texts), "images": len(images),
                                    "block_texts": block_texts})
    mine = [b for b in range(len(blocks)) if b % world_size == rank]
    done: dict[int, torch.Tensor] = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(mine), desc=f"retrieval scores (rank {rank})", dynamic_ncols=True)
    for b in mine:
        path = os.path.join(block_dir, f"block_{b:06d}.pt") if block_dir else None
        if path and os.path.isfile(path):
            done[b] = torch.load(path, map_location="cpu", weights_only=True)
        else:
            block = blocks[b]
            tokens = [dataset.text_ids(i) for i, _ in block]
            pairs = [(t, j) for t in range(len(block)) for j in packed]
            out = torch.empty(len(block), len(images))
            for s in range(0, len(pairs), pairs_per_batch):
                chunk = pairs[s : s + pairs_per_batch]
                batch = collate([Example(str(t), images[j], tokens[t], *regions[images[j]]) for t, j in chunk])
                got = score_fn(model, batch.to(device)).float().cpu()
                rows = torch.tensor([t for t, _ in chunk])
                cols = torch.tensor([j for _, j in chunk])
                out[rows, cols] = got
            if path:
                atomic_write(path, lambda f, out=out: torch.save(out, f))
            done[b] = out
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if world_size > 1:
        gathered: list[Any] = [None] * world_size
        dist.all_gather_object(gathered, done)
        for part in gathered:
            done.update(part)
    scores = torch.cat([done[b] for b in range(len(blocks))]) if blocks else torch.empty(0, len(images))
    return scores, txt2img


def _check_manifest(block_dir: str, manifest: dict[str, Any]) -> None:
    """Saved blocks are only reused for the same evaluation (fingerprint and sizes)."""
    os.makedirs(block_dir, exist_ok=True)
    path = os.path.join(block_dir, "manifest.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        if old != manifest:
            raise ValueError(f"retrieval block_dir {block_dir}: its blocks are of another evaluation ({old}), "
                             f"not of this one ({manifest}); use another folder or delete it")
        return
    atomic_write(path, lambda f: f.write(json.dumps(manifest, sort_keys=True).encode()))


@METRICS.register_module(name="retrieval_recall")
class RetrievalRecall(DatasetMetric):
    """Image and text retrieval recall@K over the first ``num_images`` images of the split and
    all their texts, scored by the task's ``score_pairs(model, batch)`` (e.g. ITM's matching
    probability). Zero-shot when the task was never finetuned for retrieval."""

    def __init__(self, *, num_images: int = 50, ks: list[int] = (1, 5, 10), pairs_per_batch: int = 256):
        if num_images < 2:
            raise ValueError(f"num_images must be >= 2, got {num_images}")
        self.num_images, self.ks, self.pairs_per_batch = num_images, tuple(int(k) for k in ks), pairs_per_batch

    def evaluate(self, *, task: Any, model: Any, dataset: Any, device: torch.device) -> dict[str, float]:
        scores, txt2img = score_all_pairs(
            task.score_pairs, model, dataset, num_images=self.num_images, device=device,
            pairs_per_batch=self.pairs_per_batch,
        )
        return retrieval_recall(scores, txt2img, ks=self.ks)


@METRICS.register_module(name="retrieval_full")
class FullRetrievalRecall(DatasetMetric):
    """IR/TR recall@K of every text against every image of the split (``num_images``: only the
    first ones, None = all), scored by the task's ``score_pairs`` through :func:`score_all_pairs`
    (blocks of ``block_texts`` texts, ``pairs_per_batch`` pairs per batch, a progress bar with
    ``progress``). For resumable, sharded runs over a whole benchmark use tools/test.py, which
    passes a block folder, the ranks and what is evaluated."""

    def __init__(self, *, num_images: int | None = None, ks: list[int] = (1, 5, 10), pairs_per_batch: int = 256,
                 block_texts: int = 64, progress: bool = False):
        if num_images is not None and num_images < 2:
            raise ValueError(f"num_images must be >= 2 or None, got {num_images}")
        self.num_images, self.ks = num_images, tuple(int(k) for k in ks)
        self.pairs_per_batch, self.block_texts, self.progress = int(pairs_per_batch), int(block_texts), bool(progress)

    def evaluate(self, *, task: Any, model: Any, dataset: Any, device: torch.device, block_dir: str | None = None,
                 fingerprint: str = "", rank: int = 0, world_size: int = 1) -> dict[str, float]:
        was_training = model.training
        model.eval()
        try:
            scores, txt2img = score_all_pairs(
                task.score_pairs, model, dataset, device=device, num_images=self.num_images,
                pairs_per_batch=self.pairs_per_batch, block_texts=self.block_texts, block_dir=block_dir,
                fingerprint=fingerprint, rank=rank, world_size=world_size, progress=self.progress)
        finally:
            model.train(was_training)
        return retrieval_recall(scores, txt2img, ks=self.ks)
