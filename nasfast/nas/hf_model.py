"""A searched child as an ordinary Hugging Face model: config, masked-LM and sequence-classification heads.

``import nasfast`` registers ``model_type = "nasfast"`` with ``AutoConfig``, ``AutoModel``,
``AutoModelForMaskedLM`` and ``AutoModelForSequenceClassification``, so an exported folder loads with
the usual ``from_pretrained`` calls, offline.

The modules are the supernet's own (``Embeddings``, the candidate sub-layers, ``MLMHead``), built
from the config's ``operators`` list, so the masked-LM computes exactly what the supernet computes
for that child. The fused ops come from the backend named by ``kernels_backend`` (``eager`` by
default, so an exported model runs anywhere; ``native``, ``triton`` or ``auto`` select the fused
implementations, resolved per device at the first forward).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    PreTrainedModel,
)

try:
    from transformers import PreTrainedConfig
except ImportError:  # transformers < 5 spells it PretrainedConfig
    from transformers import PretrainedConfig as PreTrainedConfig
try:
    from transformers import initialization as init  # v5: these skip weights already loaded from disk
except ImportError:  # transformers < 5 calls _init_weights only on modules that were not loaded
    from torch.nn import init
from transformers.modeling_outputs import BaseModelOutput, MaskedLMOutput, SequenceClassifierOutput

from nasfast.config import ModelConfig
from nasfast.errors import UserError
from nasfast.files import writing
from nasfast.kernels.registry import BACKENDS, get_ops
from nasfast.space.candidates import Candidate, CandidateModule
from nasfast.space.supernet import Embeddings, MLMHead

MODEL_TYPE = "nasfast"


class NasfastConfig(PreTrainedConfig):
    """The child's operators (``operators``, e.g. ``["mha:4", "ffn:512", "identity"]``) and model sizes."""

    model_type = MODEL_TYPE

    def __init__(
        self,
        vocab_size: int = 8192,
        hidden_size: int = 128,
        operators: Optional[Sequence[str]] = None,
        max_position_embeddings: int = 128,
        hidden_dropout_prob: float = 0.1,
        classifier_dropout: Optional[float] = None,
        layer_norm_eps: float = 1e-12,
        initializer_range: float = 0.02,
        kernels_backend: str = "eager",
        pad_token_id: Optional[int] = 0,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.operators = list(operators) if operators is not None else ["mha:2", "ffn:512"]
        self.max_position_embeddings = max_position_embeddings
        self.hidden_dropout_prob = hidden_dropout_prob
        self.classifier_dropout = classifier_dropout
        self.layer_norm_eps = layer_norm_eps
        self.initializer_range = initializer_range
        self.kernels_backend = kernels_backend
        self.pad_token_id = pad_token_id
        super().__init__(**kwargs)
        self.num_hidden_layers = len(self.operators)

    @property
    def arch(self) -> str:
        return "|".join(self.operators)

    def model_config(self) -> ModelConfig:
        return ModelConfig(hidden=self.hidden_size, max_len=self.max_position_embeddings, dropout=self.hidden_dropout_prob,
                           layer_norm_eps=self.layer_norm_eps, init_std=self.initializer_range)


class NasfastPreTrainedModel(PreTrainedModel):
    config_class = NasfastConfig
    config: NasfastConfig
    base_model_prefix = "nasfast"
    _no_split_modules = ["Embeddings"]
    # The losses are means over the batch; tell Trainer to scale them for gradient accumulation itself
    # (forward takes **kwargs only to accept BERT-style extras).
    accepts_loss_kwargs = False

    def _init_weights(self, module: nn.Module) -> None:
        # The base class covers Linear / Embedding / LayerNorm with initializer_range; the parameters the
        # supernet adds by hand get the supernet's initialisation. ``init.*`` skips weights loaded from disk.
        super()._init_weights(module)
        if isinstance(module, CandidateModule):
            module.init_weights(init)
        elif isinstance(module, MLMHead):
            init.zeros_(module.bias)


class NasfastModel(NasfastPreTrainedModel):
    """Embeddings and the child's layers (post-LN sub-layers); returns the last hidden state."""

    def __init__(self, config: NasfastConfig):
        super().__init__(config)
        if config.kernels_backend not in BACKENDS:
            raise ValueError(f"kernels_backend must be one of {', '.join(BACKENDS)}, got '{config.kernels_backend}'")
        mcfg = config.model_config()
        self.embeddings = Embeddings(config.vocab_size, mcfg)
        self.layers = nn.ModuleList(self._candidate(n, config.hidden_size).build(config.hidden_size, mcfg) for n in config.operators)
        self._ops: dict = {}
        self.post_init()

    @staticmethod
    def _candidate(token: str, hidden: int) -> Candidate:
        cand = Candidate.parse(token)  # a kind registered outside nasfast must be imported before loading
        cand.validate(hidden)
        return cand

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings.tokens = value

    def ops_for(self, device: torch.device):
        """The backend's ops for ``device`` (``auto`` resolves differently on CPU and CUDA)."""
        key = torch.device(device).type
        if key not in self._ops:
            self._ops[key] = get_ops(self.config.kernels_backend, device)
        return self._ops[key]

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        token_type_ids: Optional[torch.Tensor] = None,  # accepted for BERT-style callers; there are no segment embeddings
        output_hidden_states: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        **kwargs,
    ) -> BaseModelOutput:
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if output_attentions if output_attentions is not None else self.config.output_attentions:
            # Fail loudly rather than return attentions=None the way an ignored flag would.
            raise ValueError("output_attentions=True is not supported by nasfast models: the fused attention ops never "
                             "materialise the attention probabilities (hidden states are: output_hidden_states=True)")
        token_mask = None if attention_mask is None else attention_mask.bool()
        ops = self.ops_for(input_ids.device)
        x = self.embeddings(input_ids, ops)
        states = [x] if output_hidden_states else None
        for layer in self.layers:
            x = layer(x, token_mask, ops)
            if states is not None:
                states.append(x)
        return BaseModelOutput(last_hidden_state=x, hidden_states=tuple(states) if states is not None else None)


class NasfastForMaskedLM(NasfastPreTrainedModel):
    """The supernet's MLM head (dense + GELU + LayerNorm, decoder tied to the token embedding)."""

    def __init__(self, config: NasfastConfig):
        super().__init__(config)
        self.nasfast = NasfastModel(config)
        self.head = MLMHead(config.vocab_size, config.model_config())
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        token_type_ids: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        output_hidden_states: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        **kwargs,
    ) -> MaskedLMOutput:
        out = self.nasfast(input_ids, attention_mask, output_hidden_states=output_hidden_states,
                           output_attentions=output_attentions)
        # The decoder is the token embedding itself (read at call time), so it stays tied through
        # save/load and resizing without a separate tied parameter.
        logits = self.head(out.last_hidden_state, self.nasfast.embeddings.tokens.weight)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.view(-1, logits.shape[-1]).float(), labels.view(-1).to(logits.device))
        return MaskedLMOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)


class ClassificationHead(nn.Module):
    """BERT/RoBERTa-style: the first ([CLS]) hidden state -> dropout -> dense + tanh -> dropout -> labels."""

    def __init__(self, config: NasfastConfig):
        super().__init__()
        p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(p)
        self.out_proj = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = self.dropout(hidden[:, 0])
        x = self.dropout(torch.tanh(self.dense(x)))
        return self.out_proj(x)


class NasfastForSequenceClassification(NasfastPreTrainedModel):
    def __init__(self, config: NasfastConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.nasfast = NasfastModel(config)
        self.classifier = ClassificationHead(config)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        token_type_ids: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        output_hidden_states: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        **kwargs,
    ) -> SequenceClassifierOutput:
        out = self.nasfast(input_ids, attention_mask, output_hidden_states=output_hidden_states,
                           output_attentions=output_attentions)
        logits = self.classifier(out.last_hidden_state)
        loss = None
        if labels is not None:
            labels = labels.to(logits.device)
            if self.config.problem_type is None:  # the same inference as transformers' own heads
                if self.num_labels == 1:
                    self.config.problem_type = "regression"
                elif labels.dtype in (torch.long, torch.int):
                    self.config.problem_type = "single_label_classification"
                else:
                    self.config.problem_type = "multi_label_classification"
            if self.config.problem_type == "regression":
                loss = F.mse_loss(logits.squeeze(-1), labels.float().view(-1))
            elif self.config.problem_type == "single_label_classification":
                loss = F.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1))
            else:
                loss = F.binary_cross_entropy_with_logits(logits, labels.float())
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)


def register() -> None:
    """Make the Auto classes know ``model_type = "nasfast"`` (idempotent)."""
    AutoConfig.register(MODEL_TYPE, NasfastConfig, exist_ok=True)
    AutoModel.register(NasfastConfig, NasfastModel, exist_ok=True)
    AutoModelForMaskedLM.register(NasfastConfig, NasfastForMaskedLM, exist_ok=True)
    AutoModelForSequenceClassification.register(NasfastConfig, NasfastForSequenceClassification, exist_ok=True)


register()


# --- conversion from a nasfast StaticModel ----------------------------------------------------------
def config_for(static, tokenizer=None, backend: str = "eager", **extra) -> NasfastConfig:
    """The HF config of a StaticModel (``nasfast.space.supernet.StaticModel``)."""
    if backend not in BACKENDS:
        raise UserError(f"backend must be one of {', '.join(BACKENDS)}, got '{backend}'")
    cfg: ModelConfig = static.cfg
    special = {}
    if tokenizer is not None:
        special = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.cls_token_id,
                   "eos_token_id": tokenizer.sep_token_id}
    return NasfastConfig(
        vocab_size=static.vocab_size, hidden_size=cfg.hidden, operators=[static.space.candidates[i].name for i in static.arch],
        max_position_embeddings=cfg.max_len, hidden_dropout_prob=cfg.dropout, layer_norm_eps=cfg.layer_norm_eps,
        initializer_range=cfg.init_std, kernels_backend=backend, **special, **extra,
    )


def to_masked_lm(static, tokenizer=None, backend: str = "eager", **extra) -> NasfastForMaskedLM:
    """A NasfastForMaskedLM holding exactly the StaticModel's weights (same module classes, renamed keys)."""
    model = NasfastForMaskedLM(config_for(static, tokenizer, backend, **extra))
    state = {(k if k.startswith("head.") else f"nasfast.{k}"): v for k, v in static.state_dict().items()}
    model.load_state_dict(state, strict=True)
    model.train(static.training)
    return model


def is_export_folder(path: Path) -> bool:
    import json

    try:
        return json.loads((path / "config.json").read_text()).get("model_type") == MODEL_TYPE
    except (OSError, ValueError):
        return False


def save_folder(model: PreTrainedModel, tokenizer, out: Path) -> Path:
    """``save_pretrained`` model (safetensors) and tokenizer into a temp folder, then move it to ``out``.

    A reader never sees a half-written export; an existing earlier export in ``out`` is replaced, any
    other non-empty folder is refused.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not is_export_folder(out))):
        raise UserError(f"--out {out} exists and is not an earlier nasfast export; choose an empty or new folder")
    with writing(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes the folder private; an export is an ordinary folder
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # its "Writing model shards" bar would be a second stderr line of an error
    try:
        with writing(out, partial=tmp):  # a full disk: one line naming --out; the earlier export stays
            model.save_pretrained(str(tmp), safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
