"""A post-LN BERT-style transformer encoder on ``scaled_dot_product_attention``.

Numerically the same layer as BERT (erf GELU, LayerNorm after each residual), so BERT and UNITER
checkpoints load into it by renaming keys. Padding is a boolean key mask: padded keys get
``-inf`` (BERT used an additive -10000; both give exactly zero weight in fp32).

Packed (variable-length) path: with ``varlen`` active the encoder runs on the real tokens only,
as one ``[total, H]`` tensor; the linear layers, GELU and LayerNorms see no padding and attention
runs per sequence on jagged nested tensors through SDPA (flash/memory-efficient varlen kernels on
CUDA). ``varlen="cuda"`` (default) uses it on CUDA and the padded path elsewhere; ``"always"``
also on the CPU (the math kernel: correct, used by tests, not faster there); ``"never"`` pads.
Optional ``torch.compile`` (``compile=True``): the padded path pads the sequence to a multiple of
``length_multiple`` and marks the batch dimension dynamic, so graphs are compiled once per length
bucket, not once per batch shape; ``compiled_graphs`` counts them.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from vlframe.registry import MODELS

_VARLEN_MODES = ("cuda", "always", "never")


class Jagged:
    """Where each sequence of a packed ``[total, H]`` tensor starts: ``offsets`` [B + 1]."""

    def __init__(self, offsets: torch.Tensor, max_len: int):
        self.offsets = offsets
        self.max_len = max_len

    def nest(self, x: torch.Tensor) -> torch.Tensor:
        """[total, heads, d] -> jagged [B, heads, j, d] (a view: no copy)."""
        nt = torch.nested.nested_tensor_from_jagged(x, self.offsets, max_seqlen=self.max_len)
        return nt.transpose(1, 2)


class SelfAttention(nn.Module):
    def __init__(self, *, hidden_size: int, num_heads: int, dropout: float = 0.1):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not a multiple of num_heads {num_heads}")
        self.num_heads = num_heads
        self.dropout = dropout
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        self.out = nn.Linear(hidden_size, hidden_size)
        self.weights_sink: list[torch.Tensor] | None = None  # set by attention_weights() only

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | Jagged | None) -> torch.Tensor:
        if isinstance(attn_mask, Jagged):
            return self._forward_jagged(x, attn_mask)
        b, n, h = x.shape
        split = lambda t: t.view(b, n, self.num_heads, h // self.num_heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        if self.weights_sink is not None:
            y = self._explicit(q, k, v, attn_mask)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
            )
        return self.out(y.transpose(1, 2).reshape(b, n, h))

    def _explicit(self, q, k, v, attn_mask):
        """softmax(q k^T / sqrt(d)) v written out, keeping the weights (visualisation only: the
        training path is SDPA's fused kernel, which never forms them)."""
        scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        w = scores.softmax(-1)
        self.weights_sink.append(w.detach())
        return F.dropout(w, self.dropout, self.training) @ v
    def _forward_jagged(self, x: torch.Tensor, jag: Jagged) -> torch.Tensor:
        total, h = x.shape
        split = lambda t: jag.nest(t.view(total, self.num_heads, h // self.num_heads))  # noqa: E731
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).values().reshape(total, h))


class TransformerLayer(nn.Module):
    def __init__(
        self,
        *,
        hidden_size: int,
        num_heads: int,
        intermediate_size: int,
        hidden_dropout: float = 0.1,
        attention_dropout: float = 0.1,
        layer_norm_eps: float = 1e-12,
    ):
        super().__init__()
        self.attn = SelfAttention(hidden_size=hidden_size, num_heads=num_heads, dropout=attention_dropout)
        self.attn_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.ffn_in = nn.Linear(hidden_size, intermediate_size)
        self.ffn_out = nn.Linear(intermediate_size, hidden_size)
        self.ffn_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.drop = nn.Dropout(hidden_dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | Jagged | None) -> torch.Tensor:
        x = self.attn_norm(x + self.drop(self.attn(x, attn_mask)))
        return self.ffn_norm(x + self.drop(self.ffn_out(F.gelu(self.ffn_in(x)))))


@MODELS.register_module(name="TransformerEncoder")
class TransformerEncoder(nn.Module):
    """``num_layers`` post-LN layers. ``forward(x, mask)`` with ``mask`` [B, L] bool (True = real).

    ``varlen``: "cuda" | "always" | "never", the packed path (module docstring). ``compile``:
    ``torch.compile`` the layers with ``compile_backend``, the padded sequence padded to a
    multiple of ``length_multiple`` so that recompiles stay bounded. Padding slots of the output
    hold arbitrary values (zeros on the packed path).
    """

    def __init__(
        self,
        *,
        hidden_size: int = 768,
        num_layers: int = 12,
        num_heads: int = 12,
        intermediate_size: int = 3072,
        hidden_dropout: float = 0.1,
        attention_dropout: float = 0.1,
        layer_norm_eps: float = 1e-12,
        gradient_checkpointing: bool = False,
        varlen: str = "cuda",
        compile: bool = False,
        compile_backend: str = "inductor",
        length_multiple: int = 1,
    ):
        super().__init__()
        if varlen not in _VARLEN_MODES:
            raise ValueError(f"TransformerEncoder: varlen must be one of {_VARLEN_MODES}, got {varlen!r}")
        if isinstance(length_multiple, bool) or not isinstance(length_multiple, int) or length_multiple < 1:
            raise ValueError(f"TransformerEncoder: length_multiple must be an integer >= 1, got {length_multiple!r}")
        self.gradient_checkpointing = gradient_checkpointing
        self.varlen = varlen
        self.length_multiple = length_multiple
        self.compile_backend = compile_backend
        self.compiled_graphs = 0  # graphs torch.compile built (first compile + recompiles + breaks)
        self._run = torch.compile(self._layers, backend=self._count_backend) if compile else self._layers
        self.layers = nn.ModuleList(
            TransformerLayer(
                hidden_size=hidden_size,
                num_heads=num_heads,
                intermediate_size=intermediate_size,
                hidden_dropout=hidden_dropout,
                attention_dropout=attention_dropout,
                layer_norm_eps=layer_norm_eps,
            )
            for _ in range(num_layers)
        )

    @property
    def _compiled(self) -> bool:
        # ==, not `is`: every attribute read of self._layers makes a new bound-method object, so
        # an identity test is always true and the eager path would pad to length_multiple too
        return self._run != self._layers

    def uses_varlen(self, device: torch.device | str) -> bool:
        """Whether inputs on ``device`` run packed (real tokens only)."""
        return self.varlen == "always" or (self.varlen == "cuda" and torch.device(device).type == "cuda")

    def _count_backend(self, gm, example_inputs):
        self.compiled_graphs += 1
        return torch._dynamo.lookup_backend(self.compile_backend)(gm, example_inputs)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is not None and self.uses_varlen(x.device):
            return self._forward_packed(x, mask)
        b, n, _ = x.shape
        if self._compiled:
            # Bucketed length: one graph per multiple of length_multiple; batch size stays symbolic.
            pad = -n % self.length_multiple
            if pad:
                x = F.pad(x, (0, 0, 0, pad))
                mask = F.pad(mask if mask is not None else x.new_ones(b, n, dtype=torch.bool), (0, pad))
        # [B, 1, 1, L] broadcasts over heads and queries; SDPA reads True as "may attend".
        attn_mask = None if mask is None else mask[:, None, None, :]
        if self._compiled and b > 1:
            torch._dynamo.maybe_mark_dynamic(x, 0)
            if attn_mask is not None:
                torch._dynamo.maybe_mark_dynamic(attn_mask, 0)
        return self._run(x, attn_mask)[:, :n]

    def _forward_packed(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, h = x.shape
        lengths = mask.sum(1)
        offsets = F.pad(lengths.cumsum(0), (1, 0))
        rows = mask.reshape(-1).nonzero().squeeze(1)  # flat [B * L] positions of the real tokens
        values = x.reshape(b * n, h).index_select(0, rows)
        max_len = n
        if self._compiled:
            # max_seqlen only bounds the kernels' work: a bucketed bound keeps it off the guards
            max_len = n + (-n % self.length_multiple)
            torch._dynamo.maybe_mark_dynamic(values, 0)
            torch._dynamo.maybe_mark_dynamic(offsets, 0)
        out = self._run(values, Jagged(offsets, max_len))
        return out.new_zeros(b * n, h).index_copy(0, rows, out).view(b, n, h)

    def _layers(self, x: torch.Tensor, attn_mask: torch.Tensor | Jagged | None) -> torch.Tensor:
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                # The non-reentrant variant reads the sizes of saved tensors, which nested tensors
                # (the packed path's attention) do not have; the reentrant one saves none.
                reentrant = isinstance(attn_mask, Jagged)
                x = torch.utils.checkpoint.checkpoint(layer, x, attn_mask, use_reentrant=reentrant)
            else:
                x = layer(x, attn_mask)
        return x


@contextlib.contextmanager
def attention_weights(module: nn.Module):
    """Within the block, every ``SelfAttention`` under ``module`` runs the explicit path and
    appends its weights [B, heads, L, L] to the yielded list, in the order the layers run::

        with attention_weights(model) as maps:
            model(batch)
        # maps[i]: layer i (padded keys get weight 0)
    """
    layers = [m for m in module.modules() if isinstance(m, SelfAttention)]
    maps: list[torch.Tensor] = []
    for m in layers:
        m.weights_sink = maps
    try:
        yield maps
    finally:
        for m in layers:
            m.weights_sink = None


def init_bert_weights(module: nn.Module, std: float = 0.02) -> None:
    """BERT's initialisation: N(0, std) for Linear/Embedding weights, zero biases, unit LayerNorm."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
            if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
