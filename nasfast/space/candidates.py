"""Candidate operators of the search space: one registered class per kind.

A candidate kind is a frozen dataclass whose fields are its sizes (``heads``, ``inner``, ``width`` …)
and which carries everything the rest of nasfast needs to know about it:

- its token: ``kind`` plus the fields, ``:``-separated (``mha:4``, ``ffn:512``, ``identity``); the
  default ``from_token`` parses positive integers, a kind with other arguments overrides it;
- its constraints: ``__post_init__`` for the token alone (a convolution's odd width), ``validate``
  for what depends on the hidden size (attention heads must divide it);
- ``mixes_tokens``: whether it mixes positions (attention, convolution; default False);
- its exact parameter count and forward FLOPs (matmuls and convolutions, 2 per multiply-add);
- ``build``: the ``nn.Module`` of one (layer, candidate), called as ``module(x, token_mask, ops)``;
  its ``init_weights`` hook initialises what the generic init (normal ``Linear``/``Embedding``
  weights, zero biases) does not cover.

``@register_candidate`` makes a kind usable in ``space.candidates``, arch ids and exported models;
it works from outside the package too (a kind defined in your own module is registered once that
module is imported, which must happen before a config or an exported model naming it is loaded)::

    class LowRankModule(CandidateModule):          # forward(x, token_mask, ops), init_weights(init)
        ...

    @register_candidate
    @dataclass(frozen=True)
    class LowRank(Candidate):
        kind: ClassVar[str] = "lowrank"
        usage: ClassVar[str] = "lowrank:<rank>"
        rank: int
        def num_params(self, hidden): ...
        def forward_flops(self, hidden, seq_len): ...
        def build(self, hidden, cfg): return LowRankModule(hidden, self.rank)

``tests/test_candidates.py`` registers exactly this kind and trains it. Module classes that read a
sub-module's parameters in their own forward (as ``Sublayer`` reads its LayerNorm) must derive from
``CandidateModule``: ZeRO-3 then gathers each one whole.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, ClassVar, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from nasfast.config import ModelConfig
from nasfast.errors import UserError

if TYPE_CHECKING:  # annotations only: the backend is handed to forward, never imported here
    from nasfast.kernels.registry import OpSet

LAYERNORM_PARAMS_PER_H = 2  # weight + bias
MAX_CANDIDATE_SIZE = 1 << 20  # a candidate size (heads, inner, width) above this can only be a typo

CANDIDATES: dict[str, type["Candidate"]] = {}


def register_candidate(cls: type["Candidate"]) -> type["Candidate"]:
    """Class decorator: register a candidate kind under ``cls.kind`` (see the module docstring)."""
    if not (isinstance(cls, type) and issubclass(cls, Candidate)):
        raise TypeError(f"{cls!r} is not a subclass of nasfast.space.candidates.Candidate")
    kind = getattr(cls, "kind", "")
    if not kind or not kind.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"{cls.__name__}.kind must be a non-empty name of letters, digits, '-' or '_', got {kind!r}")
    if kind in CANDIDATES and CANDIDATES[kind] is not cls:
        raise ValueError(f"candidate kind '{kind}' is already registered by {CANDIDATES[kind].__name__}")
    CANDIDATES[kind] = cls
    return cls


@dataclass(frozen=True)
class Candidate:
    """Base of every candidate kind; the dataclass fields are the kind's sizes (see the module docstring)."""

    kind: ClassVar[str] = ""
    usage: ClassVar[str] = ""  # how the token is written, for error messages, e.g. "mha:<heads>"
    # True for an operator that mixes information across positions (attention, convolution). A child
    # without one sees each token alone and can learn only unigram statistics, so it is no meaningful
    # reference child or MAGIC-A anchor (nasfast.space.searchspace.SearchSpace.has_context).
    mixes_tokens: ClassVar[bool] = False

    @property
    def name(self) -> str:
        """The token, e.g. ``mha:4``; arch ids, configs and exported models spell candidates this way."""
        return ":".join([self.kind, *(str(getattr(self, f.name)) for f in fields(self))])

    @staticmethod
    def parse(text: str) -> "Candidate":
        text = str(text).strip()
        cls = CANDIDATES.get(text.partition(":")[0])
        if cls is None:
            expected = ", ".join(c.usage or c.kind for c in CANDIDATES.values())
            raise UserError(f"unknown candidate '{text}': expected one of {expected}")
        return cls.from_token(text)

    @classmethod
    def from_token(cls, text: str) -> "Candidate":
        """The default token grammar: ``kind`` followed by one positive integer per field."""
        args = text.split(":")[1:]
        names = [f.name for f in fields(cls)]
        # length first: int() of a 5000-digit string raises instead of parsing
        if len(args) != len(names) or not all(a.isascii() and a.isdigit() and len(a) < 20 and int(a) > 0 for a in args):
            raise UserError(f"candidate '{text}': expected {cls.usage or cls.kind} (positive integers)")
        big = [a for a in args if int(a) > MAX_CANDIDATE_SIZE]
        if big:
            raise UserError(f"candidate '{text}': {big[0]} is more than the limit {MAX_CANDIDATE_SIZE:,} (a typo?)")
        return cls(*(int(a) for a in args))

    def validate(self, hidden: int) -> None:
        """Raise a UserError if this candidate cannot be built at this hidden size."""

    def num_params(self, hidden: int) -> int:
        """Exact parameter count of this candidate's sub-layer (op + its LayerNorm)."""
        raise NotImplementedError(f"{type(self).__name__}.num_params")

    def forward_flops(self, hidden: int, seq_len: int) -> int:
        """Exact matmul/conv FLOPs (2 per multiply-add) of one sequence through this sub-layer.

        Elementwise work (GELU, softmax, LayerNorm, bias adds, gating products) is not counted, the
        usual convention and what ``torch.utils.flop_counter`` counts.
        """
        raise NotImplementedError(f"{type(self).__name__}.forward_flops")

    def build(self, hidden: int, cfg: ModelConfig) -> nn.Module:
        """The module of one (layer, candidate): ``module(x, token_mask, ops) -> x'`` of the same shape."""
        raise NotImplementedError(f"{type(self).__name__}.build")


# --- module bases -------------------------------------------------------------------------------
class CandidateModule(nn.Module):
    """Base of the modules candidates build: ``forward(x, token_mask, ops)`` and an init hook."""

    def init_weights(self, init) -> None:
        """Initialise parameters the generic init does not cover (raw ``nn.Parameter``s).

        ``init`` is ``torch.nn.init`` or transformers' equivalent (which skips weights loaded from
        disk). The supernet calls this before its generic init reaches this module's sub-modules.
        """


class Sublayer(CandidateModule):
    """Base of the post-LN sub-layers (op -> dropout -> residual add -> LayerNorm): owns the LayerNorm."""

    def __init__(self, hidden: int, cfg: ModelConfig):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, eps=cfg.layer_norm_eps)
        self.dropout = cfg.dropout

    def tail(self, ops: OpSet, out: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return ops.add_dropout_layernorm(
            out, residual, self.norm.weight, self.norm.bias, self.dropout, self.training, self.norm.eps
        )


# --- the kinds: each is its module and its registered class ------------------------------------------
class AttentionModule(Sublayer):
    def __init__(self, hidden: int, heads: int, cfg: ModelConfig):
        super().__init__(hidden, cfg)
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, token_mask: Optional[torch.Tensor], ops: OpSet) -> torch.Tensor:
        B, T, H = x.shape
        qkv = ops.linear(x, self.qkv.weight, self.qkv.bias)
        if "qkv_attention" in ops.fused:  # packed kernel: no q/k/v, output or gradient transposes
            ctx = ops.qkv_attention(qkv, self.heads, token_mask)
        else:  # eager, or a backend with only the per-tensor attention (e.g. triton)
            q, k, v = qkv.view(B, T, 3, self.heads, H // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
            ctx = ops.attention(q, k, v, token_mask).transpose(1, 2).reshape(B, T, H)
        return self.tail(ops, ops.linear(ctx, self.proj.weight, self.proj.bias), x)


@register_candidate
@dataclass(frozen=True)
class MultiHeadAttention(Candidate):
    """``mha:h``: self-attention with ``h`` heads of ``hidden / h`` dims (fused QKV + output projection)."""

    kind: ClassVar[str] = "mha"
    usage: ClassVar[str] = "mha:<heads>"
    mixes_tokens: ClassVar[bool] = True
    heads: int

    def validate(self, hidden: int) -> None:
        if hidden % self.heads:
            raise UserError(f"candidate '{self.name}': hidden size {hidden} is not divisible by {self.heads} heads")

    def num_params(self, hidden: int) -> int:
        H = hidden
        return 4 * H * H + 4 * H + LAYERNORM_PARAMS_PER_H * H  # qkv + output projection, with biases

    def forward_flops(self, hidden: int, seq_len: int) -> int:
        H, T = hidden, seq_len
        return 2 * T * H * 3 * H + 2 * T * T * H * 2 + 2 * T * H * H  # qkv, QK^T and PV, output

    def build(self, hidden: int, cfg: ModelConfig) -> nn.Module:
        return AttentionModule(hidden, self.heads, cfg)


def _gelu_inputs(x: torch.Tensor, linear: nn.Linear) -> tuple:
    """(x @ W^T, bias) for bias_gelu, the bias in the projection's dtype: under autocast it joins in
    bf16 as nn.Linear's own bias would, instead of promoting the [rows, inner] activation to fp32."""
    h = F.linear(x, linear.weight)
    return h, linear.bias.to(h.dtype)


class FeedForwardModule(Sublayer):
    def __init__(self, hidden: int, inner: int, cfg: ModelConfig):
        super().__init__(hidden, cfg)
        self.fc1 = nn.Linear(hidden, inner)
        self.fc2 = nn.Linear(inner, hidden)

    def forward(self, x: torch.Tensor, token_mask: Optional[torch.Tensor], ops: OpSet) -> torch.Tensor:
        inner = ops.bias_gelu(*_gelu_inputs(x, self.fc1))
        return self.tail(ops, ops.linear(inner, self.fc2.weight, self.fc2.bias), x)


@register_candidate
@dataclass(frozen=True)
class FeedForward(Candidate):
    """``ffn:d``: BERT's feed-forward, ``H -> d -> GELU -> H``."""

    kind: ClassVar[str] = "ffn"
    usage: ClassVar[str] = "ffn:<inner>"
    inner: int

    def num_params(self, hidden: int) -> int:
        H, d = hidden, self.inner
        return 2 * H * d + d + H + LAYERNORM_PARAMS_PER_H * H

    def forward_flops(self, hidden: int, seq_len: int) -> int:
        return 2 * seq_len * hidden * self.inner * 2

    def build(self, hidden: int, cfg: ModelConfig) -> nn.Module:
        return FeedForwardModule(hidden, self.inner, cfg)


class GatedFeedForwardModule(Sublayer):
    """GEGLU feed-forward: ``down(GELU(gate(x)) * up(x))``."""

    def __init__(self, hidden: int, inner: int, cfg: ModelConfig):
        super().__init__(hidden, cfg)
        self.gate = nn.Linear(hidden, inner)
        self.up = nn.Linear(hidden, inner)
        self.down = nn.Linear(inner, hidden)

    def forward(self, x: torch.Tensor, token_mask: Optional[torch.Tensor], ops: OpSet) -> torch.Tensor:
        inner = ops.bias_gelu(*_gelu_inputs(x, self.gate)) * ops.linear(x, self.up.weight, self.up.bias)
        return self.tail(ops, ops.linear(inner, self.down.weight, self.down.bias), x)


@register_candidate
@dataclass(frozen=True)
class GatedFeedForward(Candidate):
    """``geglu:d``: gated feed-forward, ``down(GELU(gate(x)) * up(x))`` with inner size ``d``.

    GLU variants (Shazeer 2020, "GLU Variants Improve Transformer") reached lower pre-training
    (span-corruption, a masked-LM relative) perplexity than the plain GELU FFN at the same parameters
    and FLOPs and are the FFN of T5.1.1, PaLM and
    LLaMA. In this space they let the search weigh a gated against a plain FFN at one budget: with
    ``d`` = 2/3 of an ``ffn``'s inner size, ``geglu:d`` has about the same parameters and FLOPs.
    Three projections with biases (gate, up, down) and the post-LN tail of every sub-layer.
    """

    kind: ClassVar[str] = "geglu"
    usage: ClassVar[str] = "geglu:<inner>"
    inner: int

    def num_params(self, hidden: int) -> int:
        H, d = hidden, self.inner
        return 3 * H * d + 2 * d + H + LAYERNORM_PARAMS_PER_H * H  # gate, up (+biases), down (+bias)

    def forward_flops(self, hidden: int, seq_len: int) -> int:
        return 2 * seq_len * hidden * self.inner * 3

    def build(self, hidden: int, cfg: ModelConfig) -> nn.Module:
        return GatedFeedForwardModule(hidden, self.inner, cfg)


class SeparableConvModule(Sublayer):
    """Separable convolution: depthwise conv (width k) + bias + GELU, then pointwise projection."""

    def __init__(self, hidden: int, width: int, cfg: ModelConfig):
        super().__init__(hidden, cfg)
        self.depthwise_weight = nn.Parameter(torch.empty(hidden, width))
        self.depthwise_bias = nn.Parameter(torch.zeros(hidden))
        self.pointwise = nn.Linear(hidden, hidden)

    def init_weights(self, init) -> None:
        # fan-in of a depthwise filter is its width, not the hidden size the generic std is set for
        init.normal_(self.depthwise_weight, std=self.depthwise_weight.shape[1] ** -0.5)
        init.zeros_(self.depthwise_bias)

    def forward(self, x: torch.Tensor, token_mask: Optional[torch.Tensor], ops: OpSet) -> torch.Tensor:
        y = ops.dwconv_bias_gelu(x, self.depthwise_weight, self.depthwise_bias, token_mask)
        return self.tail(ops, ops.linear(y, self.pointwise.weight, self.pointwise.bias), x)


@register_candidate
@dataclass(frozen=True)
class SeparableConv(Candidate):
    """``conv:k``: depthwise conv of odd width ``k`` along the sequence (+ bias, GELU), then pointwise."""

    kind: ClassVar[str] = "conv"
    usage: ClassVar[str] = "conv:<odd width>"
    mixes_tokens: ClassVar[bool] = True
    width: int

    def __post_init__(self) -> None:
        if self.width % 2 == 0:  # "same" padding centred on the token needs an odd width
            raise UserError(f"candidate '{self.name}': convolution width must be odd")

    def num_params(self, hidden: int) -> int:
        H = hidden
        return H * self.width + H + H * H + H + LAYERNORM_PARAMS_PER_H * H  # depthwise (+bias) + pointwise (+bias)

    def forward_flops(self, hidden: int, seq_len: int) -> int:
        H, T = hidden, seq_len
        return 2 * T * H * self.width + 2 * T * H * H

    def build(self, hidden: int, cfg: ModelConfig) -> nn.Module:
        return SeparableConvModule(hidden, self.width, cfg)


class IdentityModule(CandidateModule):
    def forward(self, x: torch.Tensor, token_mask: Optional[torch.Tensor], ops: OpSet) -> torch.Tensor:
        return x


@register_candidate
@dataclass(frozen=True)
class Identity(Candidate):
    """``identity``: the layer is skipped; no parameters, no computation."""

    kind: ClassVar[str] = "identity"
    usage: ClassVar[str] = "identity"

    def num_params(self, hidden: int) -> int:
        return 0

    def forward_flops(self, hidden: int, seq_len: int) -> int:
        return 0

    def build(self, hidden: int, cfg: ModelConfig) -> nn.Module:
        return IdentityModule()


def __getattr__(name: str):
    """The module classes' names before 0.2.1 (``AttentionCandidate`` was the ``nn.Module`` of
    ``MultiHeadAttention``, the candidate), importable with a warning until 0.3."""
    from nasfast._moved import renamed

    return renamed(__name__, RENAMED, name)


RENAMED = {"AttentionCandidate": "AttentionModule", "FeedForwardCandidate": "FeedForwardModule",
           "GatedFeedForwardCandidate": "GatedFeedForwardModule", "ConvCandidate": "SeparableConvModule",
           "IdentityCandidate": "IdentityModule"}
