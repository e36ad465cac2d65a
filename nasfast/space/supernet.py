"""The weight-sharing supernet and the static child models extracted from it.

One data flow: embeddings -> L mixed layers (each runs the child's candidate for that layer) ->
MLM head tied to the token embedding. The candidates' modules come from their registered kinds
(``nasfast.space.candidates``): post-LN sub-layers (op -> dropout -> residual add -> LayerNorm) whose fused
parts go through the backend's OpSet, or identity.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from nasfast import rng
from nasfast.config import ModelConfig
from nasfast.kernels.registry import get_ops
from nasfast.space.candidates import CandidateModule
from nasfast.space.searchspace import SearchSpace


class Embeddings(nn.Module):
    def __init__(self, vocab_size: int, cfg: ModelConfig):
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, cfg.hidden)
        self.positions = nn.Embedding(cfg.max_len, cfg.hidden)
        self.norm = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, input_ids: torch.Tensor, ops) -> torch.Tensor:
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.norm(self.tokens(input_ids) + self.positions(pos))
        # the backend's dropout (self.dropout holds p): eager's is F.dropout, what nn.Dropout runs, bit
        # for bit; native's a counter-hash pattern (no per-element RNG draw)
        return ops.dropout(x, self.dropout.p, self.training)


class MLMHead(nn.Module):
    """BERT's head: dense + GELU + LayerNorm, then a decoder tied to the token embedding."""

    def __init__(self, vocab_size: int, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden, cfg.hidden)
        self.norm = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, hidden: torch.Tensor, decoder_weight: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(F.gelu(self.dense(hidden))), decoder_weight, self.bias)


@dataclass
class ModelOutput:
    logits: torch.Tensor  # [M, V] at masked positions when labels are given, else [B, T, V]
    hidden_states: list  # L tensors [B, T, H]: the output of each layer
    loss: Optional[torch.Tensor] = None
    num_masked: int = 0
    num_correct: int = 0


def _init_weights(module: nn.Module, std: float) -> None:
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, CandidateModule):
            # pre-order: a candidate's own parameters are drawn before its sub-modules' (the draw order
            # every existing run was initialised with)
            m.init_weights(nn.init)


class _MaskedLM(nn.Module):
    """Shared body of the supernet and static models: embeddings, head, MLM loss at masked positions."""

    embeddings: Embeddings
    head: MLMHead

    def set_backend(self, backend: str, device: torch.device | str = "cpu") -> None:
        self.ops = get_ops(backend, device)

    def mlm_output(self, hidden_states: list, labels: Optional[torch.Tensor]) -> ModelOutput:
        last = hidden_states[-1]
        decoder = self.embeddings.tokens.weight
        if labels is None:
            return ModelOutput(self.head(last, decoder), hidden_states)
        # Project only the masked positions onto the vocabulary (data.mlm_probability of the tokens), not
        # every position: most of a small MLM's head cost (benchmarks/results/vs_transformers.md, "equal work").
        selected = labels != -100
        targets = labels[selected]
        logits = self.head(last[selected], decoder)
        loss = self.ops.cross_entropy(logits, targets)  # fp32 loss; 0 when nothing is masked
        correct = int((logits.argmax(-1) == targets).sum()) if not self.training else 0
        return ModelOutput(logits, hidden_states, loss, int(targets.numel()), correct)


class Supernet(_MaskedLM):
    """All candidates of all layers; ``forward`` runs one child given as an arch tuple."""

    def __init__(self, cfg: ModelConfig, space: SearchSpace, vocab_size: int, backend: str = "eager"):
        super().__init__()
        if space.hidden != cfg.hidden:
            raise ValueError("space.hidden must equal model.hidden")
        self.cfg, self.space, self.vocab_size = cfg, space, vocab_size
        self.embeddings = Embeddings(vocab_size, cfg)
        self.layers = nn.ModuleList(
            nn.ModuleList(c.build(cfg.hidden, cfg) for c in space.candidates) for _ in range(space.num_layers)
        )
        self.head = MLMHead(vocab_size, cfg)
        _init_weights(self, cfg.init_std)
        self.set_backend(backend)

    def embed(self, input_ids: torch.Tensor, layer_seed: Optional[int] = None) -> torch.Tensor:
        with rng.isolated(input_ids.device, enabled=layer_seed is not None):
            rng.maybe_seed_layer(layer_seed, -1)
            return self.embeddings(input_ids, self.ops)

    def run_layers(
        self,
        x: torch.Tensor,
        token_mask: Optional[torch.Tensor],
        arch: Sequence[int],
        start: int = 0,
        layer_seed: Optional[int] = None,
    ) -> list:
        """Run layers ``start..L-1`` of ``arch`` on ``x`` (the output of layer start-1); returns their outputs.

        With ``layer_seed``, layer l draws its dropout from a seed derived from (layer_seed, l), so two
        children that share a prefix of layers compute bitwise-identical hidden states on it; the
        caller's global RNG state is left as it was.
        """
        outputs = []
        with rng.isolated(x.device, enabled=layer_seed is not None):
            for layer in range(start, len(arch)):
                rng.maybe_seed_layer(layer_seed, layer)
                x = self.layers[layer][arch[layer]](x, token_mask, self.ops)
                outputs.append(x)
        return outputs

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        arch: Sequence[int],
        labels: Optional[torch.Tensor] = None,
        layer_seed: Optional[int] = None,
    ) -> ModelOutput:
        token_mask = None if attention_mask is None else attention_mask.bool()
        hidden_states = self.run_layers(self.embed(input_ids, layer_seed), token_mask, arch, layer_seed=layer_seed)
        return self.mlm_output(hidden_states, labels)

    def child_parameters(self, arch: Sequence[int]) -> list:
        """The parameters a child uses: shared embeddings/head plus its candidates."""
        params = list(self.embeddings.parameters()) + list(self.head.parameters())
        for layer, choice in enumerate(arch):
            params += list(self.layers[layer][choice].parameters())
        return params

    def extract(self, arch: Sequence[int]) -> "StaticModel":
        """A standalone model holding copies of exactly the child's weights."""
        self.space.validate(arch)
        model = StaticModel(self.cfg, self.space, arch, self.vocab_size, self.ops.name, build=False)
        model.embeddings = copy.deepcopy(self.embeddings)
        model.layers = nn.ModuleList(copy.deepcopy(self.layers[l][c]) for l, c in enumerate(arch))
        model.head = copy.deepcopy(self.head)
        model.train(self.training)
        return model


class StaticModel(_MaskedLM):
    """One fixed architecture as an ordinary model (for ground truth, export and fine-tuning)."""

    def __init__(
        self, cfg: ModelConfig, space: SearchSpace, arch: Sequence[int], vocab_size: int, backend: str = "eager", build: bool = True
    ):
        super().__init__()
        space.validate(arch)
        self.cfg, self.space, self.arch, self.vocab_size = cfg, space, tuple(arch), vocab_size
        if build:
            self.embeddings = Embeddings(vocab_size, cfg)
            self.layers = nn.ModuleList(space.candidates[c].build(cfg.hidden, cfg) for c in arch)
            self.head = MLMHead(vocab_size, cfg)
            _init_weights(self, cfg.init_std)
        self.set_backend(backend)

    @property
    def arch_id(self) -> str:
        return self.space.arch_id(self.arch)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        labels: Optional[torch.Tensor] = None,
        layer_seed: Optional[int] = None,
    ) -> ModelOutput:
        token_mask = None if attention_mask is None else attention_mask.bool()
        hidden_states = []
        with rng.isolated(input_ids.device, enabled=layer_seed is not None):
            rng.maybe_seed_layer(layer_seed, -1)
            x = self.embeddings(input_ids, self.ops)
            for index, layer in enumerate(self.layers):
                rng.maybe_seed_layer(layer_seed, index)  # the same dropout draws as the supernet running this child
                x = layer(x, token_mask, self.ops)
                hidden_states.append(x)
        return self.mlm_output(hidden_states, labels)


def child_num_params(space: SearchSpace, arch: Sequence[int], vocab_size: int, max_len: int) -> int:
    """Exact parameter count of the static model of ``arch`` (decoder tied to the embedding)."""
    H = space.hidden
    shared = vocab_size * H + max_len * H + 2 * H  # token + position embeddings + LayerNorm
    head = H * H + H + 2 * H + vocab_size  # dense + LayerNorm + decoder bias
    return shared + head + space.layer_params(arch)


def child_forward_flops(space: SearchSpace, arch: Sequence[int], vocab_size: int, seq_len: int) -> int:
    """Exact matmul FLOPs of one sequence through the child with the MLM head on every position."""
    H, T = space.hidden, seq_len
    return space.layer_flops(arch, T) + 2 * T * H * H + 2 * T * H * vocab_size


def space_cost_range(space: SearchSpace, vocab_size: int, max_len: int, seq_len: int) -> dict:
    """Exact min and max over all children of parameters and FLOPs per sequence, without enumerating
    the space (per-layer costs are additive; the embeddings and head are the same for every child)."""
    H = space.hidden
    low_p, high_p = space.cost_range(lambda c: c.num_params(H))
    low_f, high_f = space.cost_range(lambda c: c.forward_flops(H, seq_len))
    return {"params": [child_num_params(space, a, vocab_size, max_len) for a in (low_p, high_p)],
            "flops_per_sequence": [child_forward_flops(space, a, vocab_size, seq_len) for a in (low_f, high_f)]}
