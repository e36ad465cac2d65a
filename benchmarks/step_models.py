"""Training-step models shared by vs_transformers.py, profile_step.py and gpu_suite.py.

One definition of "a BERT-like training step" for every contender, so they differ only in the model:
the same batch (random tokens, every position real, 15% of positions labelled), the same optimizer
code (``nasfast.training.optim.build_optimizer`` + ``clip_and_step``: AdamW, no decay on biases/norms,
gradient clipping at 1.0) and the same dims. A BERT layer is two nasfast sub-layers (``mha:h`` then
``ffn:4H``), so L BERT layers are a 2L-layer child alternating the two candidates.

Contenders (``build_steps``):
- ``hf``: ``transformers.BertForMaskedLM`` (its MLM head projects every position onto the vocabulary);
- ``hf-masked-head``: the same model's encoder + head, with the head applied only at the labelled
  positions (the work nasfast does), so the two can be compared at equal work;
- ``hf-compile``: ``hf`` under ``torch.compile`` (forward + backward compiled, optimizer eager);
- ``child:<backend>``: the supernet's child of equal dims on a nasfast backend;
- ``static:<backend>``: the static model extracted from that child (``Supernet.extract``).

FLOPs: each contender's own fwd+bwd matmul FLOPs, counted once with ``torch.utils.flop_counter``
on its eager form (the native backend's attention is a custom op the counter cannot see; it does the
eager reference's matmuls, so the eager count is used for every backend).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F


@dataclass
class StepConfig:
    hidden: int = 512
    bert_layers: int = 3          # each is two nasfast sub-layers: mha + ffn
    batch: int = 32
    seq: int = 128
    vocab: int = 8192
    heads: Optional[int] = None   # default hidden // 64 (BERT's 64-dim heads)
    inner: Optional[int] = None   # default 4 * hidden
    dropout: float = 0.1
    mask_prob: float = 0.15
    lr: float = 1e-3
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    seed: int = 0
    device: str = "cpu"
    amp: Optional[str] = None     # "bf16": forward under torch.autocast (GPU suite); None: fp32

    def autocast(self):
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(torch.device(self.device).type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[self.amp])

    @property
    def n_heads(self) -> int:
        return self.heads or max(1, self.hidden // 64)

    @property
    def n_inner(self) -> int:
        return self.inner or 4 * self.hidden


@dataclass
class Step:
    name: str
    run: Callable[[], float]          # one full training step; returns the loss
    flops: int = 0                    # fwd+bwd matmul FLOPs of one step (this model's own)
    note: str = ""
    setup_s: float = 0.0              # build (and for compile: first-step compile) time
    extra: dict = field(default_factory=dict)


def make_batch(sc: StepConfig, device: str = "cpu") -> dict:
    g = torch.Generator().manual_seed(sc.seed)
    ids = torch.randint(5, sc.vocab, (sc.batch, sc.seq), generator=g)
    picked = torch.rand(sc.batch, sc.seq, generator=g) < sc.mask_prob
    labels = torch.where(picked, ids, torch.full_like(ids, -100))
    ids = torch.where(picked, torch.full_like(ids, 4), ids)  # [MASK]-style token at labelled positions
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    return {k: v.to(device) for k, v in batch.items()}


def nasfast_config(sc: StepConfig, backend: str = "eager"):
    from nasfast.config import Config

    cfg = Config()
    cfg.model.hidden, cfg.model.max_len, cfg.model.dropout = sc.hidden, sc.seq, sc.dropout
    cfg.space.layers = 2 * sc.bert_layers
    cfg.space.candidates = [f"mha:{sc.n_heads}", f"ffn:{sc.n_inner}"]
    cfg.data.vocab_size = sc.vocab
    cfg.train.lr, cfg.train.weight_decay, cfg.train.clip_norm = sc.lr, sc.weight_decay, sc.clip_norm
    cfg.kernels.backend = backend
    return cfg


def _optimizer(model, sc: StepConfig):
    from nasfast.training.optim import build_optimizer

    opt = build_optimizer(model, nasfast_config(sc))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)


def count_flops(fn: Callable[[], torch.Tensor]) -> int:
    """fwd+bwd FLOPs of ``fn() -> loss`` as torch's flop counter sees them (matmuls, sdpa, convs)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn().backward()
    return int(counter.get_total_flops())


def _hf_config(sc: StepConfig):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=sc.vocab, hidden_size=sc.hidden, num_hidden_layers=sc.bert_layers,
        num_attention_heads=sc.n_heads, intermediate_size=sc.n_inner, max_position_embeddings=sc.seq,
        hidden_dropout_prob=sc.dropout,
        attention_probs_dropout_prob=0.0,  # nasfast's attention has no dropout on the probabilities
        hidden_act="gelu", layer_norm_eps=1e-12, tie_word_embeddings=True,
    )


def hf_model(sc: StepConfig):
    from transformers import BertForMaskedLM

    torch.manual_seed(sc.seed)
    return BertForMaskedLM(_hf_config(sc)).to(sc.device).train()


def _trainable(model) -> list:
    return [p for p in model.parameters() if p.requires_grad]


def hf_step(sc: StepConfig, batch: dict, masked_head: bool = False, compile_mode: Optional[str] = None) -> Step:
    from nasfast.training.optim import clip_and_step

    t0 = time.perf_counter()
    model = hf_model(sc)
    opt, sched = _optimizer(model, sc)
    params = _trainable(model)

    def loss_full(m):
        with sc.autocast():
            return m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss

    def loss_masked(m):
        with sc.autocast():
            hidden = m.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            selected = batch["labels"] != -100
            logits = m.cls(hidden[selected])
        return F.cross_entropy(logits.float(), batch["labels"][selected])

    loss_of = loss_masked if masked_head else loss_full
    flops = count_flops(lambda: loss_of(model))
    opt.zero_grad(set_to_none=True)
    forward = loss_of
    name = "transformers BertForMaskedLM" + (" (head at masked positions)" if masked_head else "")
    if compile_mode is not None:
        compiled = torch.compile(model, mode=compile_mode)
        forward = lambda m: loss_of(compiled)  # noqa: E731
        name += f" + torch.compile({compile_mode})"

    def run() -> float:
        loss = forward(model)
        loss.backward()
        clip_and_step(params, opt, sched, sc.clip_norm)
        return float(loss.detach())

    note = "head projects every position" if not masked_head else "equal work to nasfast: head only at labelled positions"
    step = Step(name, run, flops, note)
    if compile_mode is not None:
        run()  # the first call compiles: counted as set-up, not step time
    step.setup_s = time.perf_counter() - t0
    return step


def nasfast_steps(sc: StepConfig, batch: dict, backends: list) -> list:
    """The child of equal dims in a supernet, and its extracted static model, per backend."""
    from nasfast.space.checks import build_space
    from nasfast.space.supernet import Supernet
    from nasfast.training.optim import clip_and_step

    cfg = nasfast_config(sc, "eager")
    space = build_space(cfg)
    arch = tuple(i % 2 for i in range(2 * sc.bert_layers))  # mha, ffn, mha, ffn, ...
    torch.manual_seed(sc.seed)
    supernet = Supernet(cfg.model, space, sc.vocab, "eager").to(sc.device).train()
    args = (batch["input_ids"], batch["attention_mask"])

    def sup_loss():
        with sc.autocast():
            return supernet(*args, arch, batch["labels"]).loss

    flops = count_flops(sup_loss)
    supernet.zero_grad(set_to_none=True)
    steps = []
    sup_opt, sup_sched = _optimizer(supernet, sc)
    for backend in backends:
        def child_run(backend=backend) -> float:
            supernet.set_backend(backend, sc.device)
            loss = sup_loss()
            loss.backward()
            params = [p for p in supernet.child_parameters(arch) if p.grad is not None]
            clip_and_step(params, sup_opt, sup_sched, sc.clip_norm)
            return float(loss.detach())

        steps.append(Step(f"nasfast child [{backend}]", child_run, flops, "supernet child; head only at labelled positions",
                          extra={"arch": space.arch_id(arch), "backend": backend}))
    for backend in backends:
        static = supernet.extract(arch)
        static.set_backend(backend, sc.device)
        opt, sched = _optimizer(static, sc)
        params = list(static.parameters())

        def static_run(static=static, opt=opt, sched=sched, params=params) -> float:
            with sc.autocast():
                loss = static(*args, batch["labels"]).loss
            loss.backward()
            clip_and_step(params, opt, sched, sc.clip_norm)
            return float(loss.detach())

        steps.append(Step(f"nasfast static [{backend}]", static_run, flops, "Supernet.extract(child)",
                          extra={"arch": space.arch_id(arch), "backend": backend}))
    return steps


def gemm_probe(n: int = 2048, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Callable[[], float]:
    """A square matmul; returns a callable giving its FLOP/s for one timed call."""
    g = torch.Generator(device="cpu").manual_seed(1)
    a = torch.randn(n, n, generator=g, dtype=torch.float32).to(device, dtype)
    b = torch.randn(n, n, generator=g, dtype=torch.float32).to(device, dtype)
    out = torch.empty(n, n, dtype=dtype, device=device)
    torch.mm(a, b, out=out)

    def run() -> float:
        if device != "cpu":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        if device != "cpu":
            torch.cuda.synchronize()
        return 2 * n ** 3 / (time.perf_counter() - t0)

    return run
