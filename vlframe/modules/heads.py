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
HEAD_SIZE_KWARGS: tuple[str, ...] = ("hidden_size", "vocab_size", "feat_dim", "num_classes")


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
