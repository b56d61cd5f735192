"""Prediction heads: registered in MODELS, selected by a task's ``head`` node, built by
:func:`build_head`.

Sizes come from the model's :class:`~vlframe.models.VLEncoderSpec` and the data at setup time: a
head's ``__init__`` names the sizes it needs among :data:`HEAD_SIZE_KWARGS` and the task fills
them in (a config that sets one to another value is an error), so no config repeats the hidden
size or the vocabulary.

Inputs. Heads at positions (MLM, MRFR, MRC) get the states of the selected positions, [N, H].
Pair heads (ITM, classification of the pair) get the whole :class:`~vlframe.models.VLEncoderOutput`
so that a head may use more than the pooled vector (e.g. a bilinear text x region head).

Ties. A head whose output layer is a model weight sets the class attribute ``tie_to`` to one of
:data:`~vlframe.models.TIE_TARGETS`; :func:`build_head` calls ``head.bind(module)`` with the
model's module of that name. The head keeps an unregistered reference to the module and reads its
weight at call time: the weight has one owner (the model), one state-dict key, and survives
``.to()``, ``load_state_dict`` and DDP.
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from vlframe.registry import MODELS, build, lookup

#: Keyword arguments a task fills in from the model's spec and the data; optional in configs.
HEAD_SIZE_KWARGS: tuple[str, ...] = ("hidden_size", "vocab_size", "feat_dim", "num_classes", "num_candidates")


class Transform(nn.Module):
    """BERT's prediction transform: Linear -> GELU -> LayerNorm."""

    def __init__(self, *, hidden_size: int, layer_norm_eps: float = 1e-12):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(F.gelu(self.dense(h)))


class TiedHead(nn.Module):
    """Base of heads whose output layer is a model module's weight (see the module docstring)."""

    tie_to: ClassVar[str]

    def bind(self, module: nn.Module) -> None:
        self.check_tie(module)
        # Not registered as a submodule: the model owns (and saves) the weight.
        self.__dict__["_tied"] = module

    def check_tie(self, module: nn.Module) -> None:  # shape checks of subclasses
        pass

    @property
    def tied(self) -> nn.Module:
        module = self.__dict__.get("_tied")
        if module is None:
            raise RuntimeError(f"{type(self).__name__} is tied to the model's {self.tie_to!r}: call bind() first")
        return module


def _check_shape(head: nn.Module, module: nn.Module, expected: tuple[int, ...]) -> None:
    got = tuple(getattr(module, "weight", torch.empty(0)).shape)
    if got != expected:
        raise ValueError(
            f"{type(head).__name__}: the model's {head.tie_to!r} has weight shape {got}, expected {expected}"
        )


@MODELS.register_module(name="TiedTokenHead")
class TiedTokenHead(TiedHead):
    """MLM: transform, then the word-embedding matrix [V, H] as decoder, plus an own bias [V]."""

    tie_to = "word_embeddings"

    def __init__(self, *, hidden_size: int, vocab_size: int):
        super().__init__()
        self.transform = Transform(hidden_size=hidden_size)
        self.bias = nn.Parameter(torch.zeros(vocab_size))
        self.shape = (vocab_size, hidden_size)

    def check_tie(self, module: nn.Module) -> None:
        _check_shape(self, module, self.shape)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(self.transform(h), self.tied.weight, self.bias)


@MODELS.register_module(name="TiedFeatureHead")
class TiedFeatureHead(TiedHead):
    """MRFR: transform, then the transposed region projection [H, D] back to feature space."""

    tie_to = "region_projection"

    def __init__(self, *, hidden_size: int, feat_dim: int):
        super().__init__()
        self.transform = Transform(hidden_size=hidden_size)
        self.bias = nn.Parameter(torch.zeros(feat_dim))
        self.shape = (hidden_size, feat_dim)

    def check_tie(self, module: nn.Module) -> None:
        _check_shape(self, module, self.shape)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        # The projection is Linear(D -> H): its weight [H, D], transposed, maps H back to D.
        return F.linear(self.transform(h), self.tied.weight.t(), self.bias)


@MODELS.register_module(name="ClassifierHead")
class ClassifierHead(nn.Module):
    """Transform then Linear(H, num_classes) (MRC, MRC-kl)."""

    def __init__(self, *, hidden_size: int, num_classes: int):
        super().__init__()
        self.transform = Transform(hidden_size=hidden_size)
        self.out = nn.Linear(hidden_size, num_classes)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.out(self.transform(h))


@MODELS.register_module(name="PooledLinearHead")
class PooledLinearHead(nn.Linear):
    """A pair head: Linear(H, num_classes) on the pooled output (the original ITM head)."""

    def __init__(self, *, hidden_size: int, num_classes: int):
        super().__init__(hidden_size, num_classes)

    def forward(self, out: Any) -> torch.Tensor:
        return super().forward(out.pooled)


@MODELS.register_module(name="MLPHead")
class MLPHead(nn.Module):
    """Linear(H, mult*H) -> GELU -> LayerNorm -> Linear(mult*H, num_classes) (VQA, SNLI-VE)."""

    def __init__(self, *, hidden_size: int, num_classes: int, mult: int = 2):
        super().__init__()
        self.hidden = nn.Linear(hidden_size, mult * hidden_size)
        self.norm = nn.LayerNorm(mult * hidden_size, eps=1e-12)
        self.out = nn.Linear(mult * hidden_size, num_classes)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(F.gelu(self.hidden(h))))


_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "tanh": nn.Tanh}


def _mlp(hidden_size: int, out_size: int, *, mult: int, activation: str) -> nn.Sequential:
    """Linear(H, mult*H) -> activation -> LayerNorm -> Linear(mult*H, out): the original's
    downstream MLP (GELU for VQA / SNLI-VE, ReLU for VCR)."""
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
    inner = mult * hidden_size
    return nn.Sequential(nn.Linear(hidden_size, inner), _ACTIVATIONS[activation](), nn.LayerNorm(inner, eps=1e-12),
                         nn.Linear(inner, out_size))


@MODELS.register_module(name="PooledClassifierHead")
class PooledClassifierHead(nn.Module):
    """Classifier on the pooled output: MLP (``mult``, ``activation``) or, with ``mult=0``, one
    Linear. VQA (3129 answers), SNLI-VE (3 classes), NLVR2 triplet (2): [B, num_classes]."""

    def __init__(self, *, hidden_size: int, num_classes: int, mult: int = 2, activation: str = "gelu"):
        super().__init__()
        self.net = _mlp(hidden_size, num_classes, mult=mult, activation=activation) if mult else nn.Linear(
            hidden_size, num_classes)

    def forward(self, out: Any) -> torch.Tensor:
        return self.net(out.pooled)


@MODELS.register_module(name="CandidateScorerHead")
class CandidateScorerHead(nn.Module):
    """Multiple choice: the batch holds ``num_candidates`` consecutive sequences per question
    (question + each candidate); MLP on each pooled output -> [B, num_candidates, num_classes].
    The original VCR head (ReLU MLP, 2 classes "wrong"/"right", ranked by the "right" logit)."""

    def __init__(self, *, hidden_size: int, num_candidates: int, num_classes: int = 2, mult: int = 2,
                 activation: str = "relu"):
        super().__init__()
        self.num_candidates = num_candidates
        self.net = _mlp(hidden_size, num_classes, mult=mult, activation=activation)

    def forward(self, out: Any) -> torch.Tensor:
        logits = self.net(out.pooled)
        return logits.view(-1, self.num_candidates, logits.shape[-1])


@MODELS.register_module(name="RegionScorerHead")
class RegionScorerHead(nn.Module):
    """One score per region (referring expressions): MLP (``mult`` > 0) or Linear(H, 1) on the
    region states; padding regions get -1e4, as the original's non-object regions -> [B, K]."""

    def __init__(self, *, hidden_size: int, mult: int = 1, activation: str = "gelu"):
        super().__init__()
        self.net = _mlp(hidden_size, 1, mult=mult, activation=activation) if mult else nn.Linear(hidden_size, 1)

    def forward(self, out: Any) -> torch.Tensor:
        scores = self.net(out.regions).squeeze(-1).float()
        return scores.masked_fill(~out.region_mask, -1e4)


class _AttentionPool(nn.Module):
    def __init__(self, hidden_size: int):
        super().__init__()
        self.score = nn.Linear(hidden_size, 1)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        w = self.score(h).squeeze(-1).float().masked_fill(~mask, float("-inf")).softmax(-1)
        return (w.to(h.dtype)[..., None] * h).sum(1)


@MODELS.register_module(name="PairScorerHead")
class PairScorerHead(nn.Module):
    """Two image-text sequences per example (NLVR2's pair settings), consecutive in the batch
    (2B sequences -> B examples). ``fusion='pair'``: concat the two pooled outputs ->
    Linear(2H, num_classes). ``'biattn'``: multi-head attention of each joint sequence over the
    other (both directions, padding masked), a shared Linear(2H, H)+ReLU+Dropout on
    [attended, own], shared attention pooling, concat -> Linear(2H, num_classes)."""

    def __init__(self, *, hidden_size: int, num_classes: int = 2, fusion: str = "pair", num_heads: int = 4,
                 dropout: float = 0.1):
        super().__init__()
        if fusion not in ("pair", "biattn"):
            raise ValueError(f"fusion must be 'pair' or 'biattn', got {fusion!r}")
        self.fusion = fusion
        if fusion == "biattn":
            self.attn_lr = nn.MultiheadAttention(hidden_size, num_heads, dropout=dropout, batch_first=True)
            self.attn_rl = nn.MultiheadAttention(hidden_size, num_heads, dropout=dropout, batch_first=True)
            self.fuse = nn.Sequential(nn.Linear(2 * hidden_size, hidden_size), nn.ReLU(), nn.Dropout(dropout))
            self.pool = _AttentionPool(hidden_size)
        self.out = nn.Linear(2 * hidden_size, num_classes)

    def forward(self, out: Any) -> torch.Tensor:
        if self.fusion == "pair":
            p = out.pooled
            return self.out(p.reshape(p.shape[0] // 2, -1))
        if out.sequence is None:
            raise ValueError("PairScorerHead(fusion='biattn') needs the joint sequence of a single-stream encoder")
        seq, mask = out.sequence, out.sequence_mask
        left, right, lm, rm = seq[0::2], seq[1::2], mask[0::2], mask[1::2]
        l2r, _ = self.attn_lr(left, right, right, key_padding_mask=~rm, need_weights=False)
        r2l, _ = self.attn_rl(right, left, left, key_padding_mask=~lm, need_weights=False)
        lh = self.pool(self.fuse(torch.cat([l2r, left], -1)), lm)
        rh = self.pool(self.fuse(torch.cat([r2l, right], -1)), rm)
        return self.out(torch.cat([lh, rh], -1))


@MODELS.register_module(name="RankingHead")
class RankingHead(nn.Linear):
    """Retrieval score Linear(H, 1) on the pooled output -> [N]. ``init_from_pair_head(weight,
    bias, row)`` starts it from a row of a 2-way matching head (the original: ITM's positive row)."""

    def __init__(self, *, hidden_size: int):
        super().__init__(hidden_size, 1)

    def init_from_pair_head(self, weight: torch.Tensor, bias: torch.Tensor, *, row: int = 1) -> None:
        with torch.no_grad():
            self.weight.copy_(weight[row : row + 1])
            self.bias.copy_(bias[row : row + 1])

    def forward(self, out: Any) -> torch.Tensor:
        return super().forward(out.pooled).squeeze(-1)


def build_head(
    node: Mapping[str, Any] | nn.Module,
    *,
    sizes: Mapping[str, int],
    tie_targets: Mapping[str, nn.Module],
    where: str,
) -> nn.Module:
    """Build a head node with the ``sizes`` its ``__init__`` names, then bind its tie (if any).

    ``sizes`` (from the model's spec and the data) fill the head's keyword arguments of those
    names; a node that sets one of them to a different value fails naming ``where.<key>``.
    An already built module is only bound.
    """
    if isinstance(node, nn.Module):
        head = node
    else:
        cfg = dict(node)
        cls = lookup(MODELS, cfg.get("type", ""), where=f"{where}.type")
        params = inspect.signature(cls).parameters
        for key, value in sizes.items():
            if key not in params:
                continue
            if key in cfg and cfg[key] != value:
                raise ValueError(f"{where}.{key}: set to {cfg[key]!r}, but the model and data give {value!r}")
            cfg[key] = value
        head = build(cfg, MODELS, where=where)
    tie = getattr(head, "tie_to", None)
    if tie is not None:
        if tie not in tie_targets:
            raise ValueError(
                f"{where}: {type(head).__name__} ties to the model's {tie!r}, which this model does not offer "
                f"(it offers: {', '.join(sorted(tie_targets)) or 'nothing'})"
            )
        head.bind(tie_targets[tie])
    return head
