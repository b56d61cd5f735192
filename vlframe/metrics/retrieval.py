"""Image-text retrieval: score every text against every image of a split, then recall@K."""
from __future__ import annotations

from typing import Any, Callable

import torch

from vlframe.data.batch import Example, collate
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
    num_images: int,
    device: torch.device,
    pairs_per_batch: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of every text of the first ``num_images`` images against each of those images."""
    images = dataset.image_ids()[:num_images]
    img_index = {img: i for i, img in enumerate(images)}
    texts = [(i, img) for i, img in enumerate(dataset.img_ids) if img in img_index]  # (example, its image)
    token_ids = {i: dataset.text_ids(i) for i, _ in texts}
    regions = {img: dataset.image_example(img) for img in images}
    txt2img = torch.tensor([img_index[img] for _, img in texts])
    pairs = [(i, img) for i, _ in texts for img in images]
    scores = []
    for s in range(0, len(pairs), pairs_per_batch):
        chunk = pairs[s : s + pairs_per_batch]
        batch = collate([Example(str(i), img, token_ids[i], *regions[img]) for i, img in chunk])
        scores.append(score_fn(model, batch.to(device)).float().cpu())
    return torch.cat(scores).view(len(texts), len(images)), txt2img


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
