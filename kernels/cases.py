"""Generated inputs for the fused ops, and the float64 error rule that judges a backend on them.

The one case generator shared by the tests (fixed cases and property-based ones), the GPU suite
(``benchmarks/gpu_suite.py``) and the CPU benchmarks (``benchmarks/bench_cases.py``). It knows no op
by name: each op's inputs, argument names, fixed cases and benchmark shape come from its
registration (``nasfast.kernels.registry.FusedOp``; the built-ins are in ``nasfast.kernels.builtin_ops``), so
a newly registered op is generated, judged and benchmarked like the others.

A :class:`CaseSpec` names an op, its sizes, dtype, input magnitude, padding mask, dropout, and one
memory *layout* per tensor argument (and for the incoming gradient). :func:`build` turns it into a
:class:`Case`: the tensors, laid out as asked, and ``call(ops, *tensors)``. :func:`judge` runs the
forward and every gradient through a backend, through the eager reference in the same dtype, and
through the reference in float64 on the same (already rounded) values, the truth, and applies

    max|backend - truth| <= 3 * max|eager - truth| + FLOOR[dtype] * max(1, max|truth|)

to the output and to each gradient (plus the documented accuracy bound of an op, where it has one:
see :func:`documented_bound`). A forward under ``torch.no_grad`` is judged too. A stricter
:class:`Rule` (another factor or floor, no documented bound) can be passed to :func:`judge`.

Layouts (same values and shape, different strides; gaps in the storage hold NaN, so an op that
reads memory it does not own produces NaN rather than a plausible wrong number):

- ``contiguous``;
- ``transposed``: the last two dims swapped in memory (1-D: as ``strided``);
- ``strided``: every second element along the last dim;
- ``offset``: a slice of a larger buffer: storage offset and a row stride larger than the width;
- ``permuted``: the leading dims stored in reverse order (e.g. [B, h, T, dh] stored as
  [T, h, B, dh], as head-split views of a projection are);
- ``broadcast``: stride 0 along the first dim (the values repeat along it).

Longer than 400 lines because the layouts, the case builder, the fixed and property-based case
strategies and the judging rule must agree with each other exactly; split, each piece would import
all the others.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from typing import Callable, List, Mapping, Optional, Sequence, Tuple

import torch

from nasfast.kernels import reference, registry

LAYOUTS = ("contiguous", "transposed", "strided", "offset", "permuted", "broadcast")
MASKS = (None, "full", "mixed", "all_pad", "first", "last")  # token_mask() also knows "lengths"
FLOOR = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
EAGER_FACTOR = 3.0


def __getattr__(name: str):
    if name == "OPS":  # every registered op (also ones registered after this module was imported)
        return registry.op_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------------------- specs
@dataclass(frozen=True)
class CaseSpec:
    """One generated call of a fused op. Sizes: x [B, T, H]; attention q, k, v [B, heads, T, dh]."""

    op: str
    B: int = 2
    T: int = 7
    H: int = 24
    heads: int = 2
    dh: int = 16
    k: int = 3                     # dwconv kernel width (odd)
    layers: int = 2                # alignment_loss layers
    dtype: torch.dtype = torch.float32
    scale: float = 1.0             # magnitude of the data inputs (x, residual, q, k, v, hiddens)
    mask: Optional[str] = None     # one of MASKS (ops with a token mask)
    mask_dtype: torch.dtype = torch.bool
    dropout: float = 0.0           # add_dropout_layernorm, dropout: p of an explicit keep mask
    training: bool = True          # add_dropout_layernorm, dropout: False = eval mode (dropout off, mask ignored)
    flat: bool = False             # row-wise ops: x as [B*T, H] (2-D) instead of [B, T, H]
    layouts: Tuple[str, ...] = ()  # per tensor argument (see arg_names); missing ones: contiguous
    grad_layout: str = "contiguous"
    seed: int = 0

    def __post_init__(self):
        if self.op not in registry.op_names():
            raise ValueError(f"unknown op {self.op!r}")
        validate = registry.get_op(self.op).validate
        if validate is not None:
            validate(self)
        for lay in (*self.layouts, self.grad_layout):
            if lay not in LAYOUTS:
                raise ValueError(f"unknown layout {lay!r}")

    def arg_names(self) -> List[str]:
        return arg_names(self)

    def layout_of(self, i: int) -> str:
        return self.layouts[i] if i < len(self.layouts) else "contiguous"

    def describe(self) -> str:
        """Short human-readable id (test ids, result rows)."""
        op = registry.get_op(self.op)
        dims = op.dims(self) if op.dims is not None else f"B{self.B} T{self.T} H{self.H}"
        parts = [self.op, dims + (" 2-D" if self.flat else ""), str(self.dtype).split(".")[-1]]
        if self.scale != 1.0:
            parts.append(f"x{self.scale:g}")
        if self.mask is not None:
            mdt = "" if self.mask_dtype == torch.bool else "/" + str(self.mask_dtype).split(".")[-1]
            parts.append(f"mask={self.mask}{mdt}")
        if self.dropout:
            parts.append(f"p={self.dropout:g}")
        if not self.training:
            parts.append("eval")
        lays = [f"{n}:{lay}" for n, lay in zip(self.arg_names(), self.layouts) if lay != "contiguous"]
        if self.grad_layout != "contiguous":
            lays.append(f"grad:{self.grad_layout}")
        if lays:
            parts.append("[" + ",".join(lays) + "]")
        return " ".join(parts)


def has_mask_arg(op: str) -> bool:
    return registry.get_op(op).masked


def arg_names(spec: CaseSpec) -> List[str]:
    """Names of the tensor arguments of ``spec``'s call, in order (the ones layouts apply to)."""
    names = list(registry.get_op(spec.op).arg_names(spec))
    if has_mask_arg(spec.op) and spec.mask is not None:
        names.append("token_mask")
    return names


# ---------------------------------------------------------------------------------------- layouts
def lay_out(values: torch.Tensor, layout: str) -> torch.Tensor:
    """A tensor equal to ``values`` (same shape, dtype, device) stored with ``layout``'s strides."""
    v = values
    if layout == "contiguous" or v.dim() == 0:
        return v.clone()
    if layout == "transposed" and v.dim() == 1:
        layout = "strided"
    fill = float("nan") if v.is_floating_point() else 1
    if layout == "transposed":
        return v.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "strided":
        buf = torch.full((*v.shape[:-1], 2 * v.shape[-1]), fill, dtype=v.dtype, device=v.device)
        out = buf[..., ::2]
        out.copy_(v)
        return out
    if layout == "offset":
        buf = torch.full((*v.shape[:-1], v.shape[-1] + 3), fill, dtype=v.dtype, device=v.device)
        flat = torch.full((buf.numel() + 5,), fill, dtype=v.dtype, device=v.device)
        out = flat[5:].view(buf.shape)[..., 1:1 + v.shape[-1]]
        out.copy_(v)
        return out
    if layout == "permuted":
        if v.dim() < 3:
            return lay_out(v, "transposed")
        lead = list(range(v.dim() - 1))
        order = lead[::-1] + [v.dim() - 1]
        stored = v.permute(*order).contiguous()
        inverse = [order.index(i) for i in range(v.dim())]
        return stored.permute(*inverse)
    if layout == "broadcast":
        # the values must already repeat along dim 0 (build() makes them so)
        return v[:1].expand_as(v)
    raise ValueError(f"unknown layout {layout!r}")


def _repeat_first(values: torch.Tensor) -> torch.Tensor:
    return values[:1].expand_as(values).clone() if values.dim() and values.shape[0] else values


# ---------------------------------------------------------------------------------------- masks
def token_mask(B: int, T: int, kind: Optional[str], gen: torch.Generator,
               dtype: torch.dtype = torch.bool) -> Optional[torch.Tensor]:
    """[B, T] padding mask (True/nonzero = real token) of one kind, or None.

    ``full``: no padding; ``mixed``: rows cycle through full, padded tail plus a hole, all padding;
    ``all_pad``: no real token; ``first`` / ``last``: only the first / last token is real;
    ``lengths``: realistic right padding, lengths from T/2 to T (row 0 full).
    """
    if kind is None:
        return None
    m = torch.zeros(B, T, dtype=torch.bool)
    if T == 0:
        pass
    elif kind == "full":
        m[:] = True
    elif kind == "mixed":
        for b in range(B):
            if b % 3 == 0:
                m[b] = True
            elif b % 3 == 1:
                n = int(torch.randint(1, T + 1, (), generator=gen))
                m[b, :n] = True
                m[b, int(torch.randint(0, T, (), generator=gen))] = False
    elif kind == "first":
        m[:, 0] = True
    elif kind == "last":
        m[:, -1] = True
    elif kind == "lengths":
        lengths = torch.randint(T // 2, T + 1, (B,), generator=gen)
        if B:
            lengths[0] = T
        m = torch.arange(T)[None, :] < lengths[:, None]
    elif kind != "all_pad":
        raise ValueError(f"unknown mask kind {kind!r}")
    return m.to(dtype)


# ---------------------------------------------------------------------------------------- cases
@dataclass
class Case:
    spec: CaseSpec
    names: List[str]                 # tensor argument names
    values: List[torch.Tensor]       # per argument: float64 values (floats, already rounded to dtype) or masks
    differentiable: List[bool]       # per argument
    call: Callable                   # call(ops, *tensors) -> output tensor
    grad_values: Optional[torch.Tensor] = None  # float64 incoming gradient (rounded to the output dtype)
    out_names: List[str] = field(default_factory=list)
    allowance: Optional[dict] = None  # documented_bound()'s cache

    def tensors(self, dtype: Optional[torch.dtype] = None, laid_out: bool = True,
                grad: bool = True) -> List[torch.Tensor]:
        """Fresh inputs: floats in ``dtype`` (default: the spec's), with the spec's layouts if ``laid_out``;
        the differentiable ones are leaves that require grad when ``grad``."""
        dtype = dtype or self.spec.dtype
        out = []
        for i, v in enumerate(self.values):
            t = v.to(dtype) if v.is_floating_point() else v
            t = lay_out(t, self.spec.layout_of(i)) if laid_out else t.clone()
            if grad and self.differentiable[i]:
                t.requires_grad_()
            out.append(t)
        return out

    def grad_output(self, dtype: torch.dtype, laid_out: bool = True) -> Optional[torch.Tensor]:
        if self.grad_values is None:
            return None
        g = self.grad_values.to(dtype)
        return lay_out(g, self.spec.grad_layout) if laid_out and g.dim() else g


def build(spec: CaseSpec, device: torch.device | str = "cpu", exact: bool = True) -> Case:
    """Inputs and call for ``spec`` (deterministic in spec.seed; no global RNG state is touched).

    ``exact``: keep float values in float64 (rounded to the case dtype, so that every evaluation sees
    the same numbers), as judging needs; ``exact=False`` keeps them in the case dtype (timing only).
    """
    gen = torch.Generator().manual_seed(spec.seed)
    B, T = spec.B, spec.T

    def rnd(*shape, scale=1.0, shift=0.0):
        if not exact:
            return (torch.randn(shape, generator=gen) * scale + shift).to(spec.dtype)
        v = torch.randn(shape, generator=gen, dtype=torch.float64) * scale + shift
        return v.to(spec.dtype).to(torch.float64)  # exactly representable in the case dtype

    op = registry.get_op(spec.op)
    # the mask is drawn before the op's inputs (stored cases' values depend on this order)
    mask = token_mask(B, T, spec.mask, gen, spec.mask_dtype) if op.masked else None
    made = op.make_inputs(spec, rnd, gen)
    values, diff, call, out_names = list(made.values), list(made.differentiable), made.call, list(made.out_names)
    if mask is not None:
        values.append(mask)
        diff.append(False)
    names = arg_names(spec)
    assert len(names) == len(values), (names, len(values))
    # a broadcast layout needs values that repeat along dim 0
    values = [_repeat_first(v) if spec.layout_of(i) == "broadcast" else v for i, v in enumerate(values)]
    values = [v.to(device) for v in values]
    out_shape = () if op.scalar_output else made.out_shape if made.out_shape is not None else tuple(values[0].shape)
    grad = rnd(*out_shape)
    if spec.grad_layout == "broadcast":
        grad = _repeat_first(grad)
    return Case(spec, names, values, diff, call, grad.to(device), out_names)


# ---------------------------------------------------------------------------------------- judging
@dataclass
class Check:
    name: str          # output or gradient name ("y", "dx", ..., "y(no_grad)")
    err: float         # max |backend - truth|
    eager_err: float   # max |eager same dtype - truth|
    allowed: float     # the rule's right-hand side
    ok: bool
    note: str = ""
    bound: float = 0.0  # the documented_bound() part of ``allowed``


def run(case: Case, ops, dtype: Optional[torch.dtype] = None, laid_out: bool = True):
    """[output, grad of each differentiable input...] (detached) of ``case`` through ``ops``."""
    dtype = dtype or case.spec.dtype
    ins = case.tensors(dtype, laid_out)
    out = case.call(ops, *ins)
    leaves = [t for t, d in zip(ins, case.differentiable) if d]
    gout = case.grad_output(out.dtype, laid_out)
    grads = torch.autograd.grad(out, leaves, gout, allow_unused=True)
    return [out.detach()] + [g if g is not None else torch.zeros_like(t) for g, t in zip(grads, leaves)]


def max_abs(t: torch.Tensor) -> float:
    return t.abs().max().item() if t.numel() else 0.0


def documented_bound(case: Case, name: str) -> float:
    """Extra error allowed on ``case``'s output ``name`` beyond the plain rule: the op's registered
    ``allowance`` (the same for every backend; e.g. attention's, beside its registration in builtin_ops), else 0."""
    allowance = registry.get_op(case.spec.op).allowance
    if allowance is None:
        return 0.0
    if case.allowance is None:
        case.allowance = allowance(case)
    return case.allowance.get(name, 0.0)


@dataclass(frozen=True)
class Rule:
    """``max|backend - truth| <= eager_factor * max|eager - truth| + floor[dtype] * max(1, max|truth|)``
    (+ the op's documented bound when ``documented``)."""

    eager_factor: float = EAGER_FACTOR
    floor: Mapping[torch.dtype, float] = field(default_factory=lambda: dict(FLOOR))
    documented: bool = True


DEFAULT_RULE = Rule()


def rule_of(op: str) -> Rule:
    """The op's registered error rule: the default, with the op's ``tolerance`` overrides."""
    tolerance = registry.get_op(op).tolerance
    if not tolerance:
        return DEFAULT_RULE
    floor = {**FLOOR, **tolerance.get("floor", {})}
    return replace(DEFAULT_RULE, **{**tolerance, "floor": floor})


def judge(case: Case, ops, eager=reference, rule: Optional[Rule] = None) -> List[Check]:
    """Apply ``rule`` (default: the op's registered rule) to ``ops`` on ``case``: output, every
    gradient, and the no-grad output.

    ``ops`` is anything with the op as an attribute (an OpSet, a backend module); so is ``eager``
    (default: the references; an op registered elsewhere is found through the registry)."""
    rule = rule or rule_of(case.spec.op)
    if not hasattr(eager, case.spec.op):
        eager = registry.get_ops("eager")
    dtype = case.spec.dtype
    got = run(case, ops)
    with torch.no_grad():
        got_nograd = case.call(ops, *case.tensors(dtype, grad=False))
    base = run(case, eager, dtype, laid_out=False)
    truth = run(case, eager, torch.float64, laid_out=False)
    checks = []
    names = case.out_names + [f"{case.out_names[0]}(no_grad)"]
    for name, g, e, t in zip(names, got + [got_nograd], base + [base[0]], truth + [truth[0]]):
        note = ""
        if g.shape != t.shape:
            checks.append(Check(name, float("inf"), 0.0, 0.0, False, f"shape {tuple(g.shape)} != {tuple(t.shape)}"))
            continue
        if g.dtype != e.dtype:
            note = f"dtype {g.dtype} != eager's {e.dtype}"
        finite = torch.isfinite(t)
        if not torch.equal(torch.isfinite(g), finite):
            checks.append(Check(name, float("nan"), 0.0, 0.0, False, "non-finite values where the truth is finite"))
            continue
        err = max_abs((g.double() - t)[finite])
        eerr = max_abs((e.double() - t)[finite])
        bound = documented_bound(case, name.split("(")[0]) if rule.documented else 0.0
        allowed = rule.eager_factor * eerr + rule.floor[dtype] * max(1.0, max_abs(t[finite])) + bound
        checks.append(Check(name, err, eerr, allowed, err <= allowed and not note, note, bound))
    return checks


def failures(checks: Sequence[Check]) -> List[str]:
    return [f"{c.name}: err {c.err:.3g} > allowed {c.allowed:.3g} (eager err {c.eager_err:.3g}) {c.note}".strip()
            for c in checks if not c.ok]


# ---------------------------------------------------------------------------------------- fixed cases
def case_seed(op: str, kind: str, index: int = 0) -> int:
    """A fixed case's input seed from what the case is (op, layout or kind, index), not from its position
    in a list: registering a new op, or reordering, leaves every other case's inputs unchanged."""
    return int.from_bytes(hashlib.sha1(f"{op}|{kind}|{index}".encode()).digest()[:4], "little")


def layout_cases(dtype: torch.dtype = torch.float32, ops: Optional[Sequence[str]] = None) -> List[CaseSpec]:
    """A fixed set that gives every tensor argument of every registered op (and the incoming
    gradient) each non-contiguous layout at least once, at awkward sizes, plus each op's registered
    regression cases (past bugs, edge sizes). The GPU suite runs these on hardware; the CPU tests
    run them through the interpreter and native ops."""
    names = registry.op_names() if ops is None else tuple(ops)
    bases = {op: CaseSpec(op, **registry.get_op(op).layout_base) for op in names}
    out: List[CaseSpec] = []
    for op, base in bases.items():
        n = len(base.arg_names())
        scalar = registry.get_op(op).scalar_output  # a scalar's incoming gradient has no layout
        for layout in LAYOUTS[1:]:
            lays = tuple(layout for _ in range(n))
            grad = "contiguous" if scalar else layout
            out.append(replace(base, dtype=dtype, layouts=lays, grad_layout=grad, seed=case_seed(op, layout)))
    # one argument at a time strided: catches a kernel that honours some strides but not others
    for op, base in bases.items():
        for i in range(len(base.arg_names())):
            lays = tuple("strided" if j == i else "contiguous" for j in range(i + 1))
            out.append(replace(base, dtype=dtype, layouts=lays, seed=case_seed(op, "strided", i)))
    for op in names:
        out += [CaseSpec(op, **{"dtype": dtype, **kw}) for kw in registry.get_op(op).regressions]
    return out


def example_cases(dtype: torch.dtype = torch.float32, ops: Optional[Sequence[str]] = None) -> List[CaseSpec]:
    """Every registered op's fixed awkward-shape examples (odd lengths, non-power-of-two widths,
    padding masks), contiguous, in ``dtype``: the cases every backend is compared on."""
    names = registry.op_names() if ops is None else tuple(ops)
    return [CaseSpec(op, **{"seed": case_seed(op, "example", i), **kw, "dtype": dtype})
            for op in names for i, kw in enumerate(registry.get_op(op).examples)]


def bench_inputs(op: str, B: int, T: int, H: int, heads: int, layers: int, ffn: int, dtype: torch.dtype,
                 device, seed: int = 0, k: int = 5, dropout: float = 0.1, keep_mask: bool = True,
                 vocab: int = 8192):
    """Realistic-size inputs for timing one op: (shape string, differentiable leaves, call(ops, *leaves)).

    The op's registered ``bench`` picks the case at these sizes (masks: ``lengths`` padding, T/2..T).
    Dropout (training) uses an explicit keep mask when ``keep_mask`` (every backend does the same
    work), else each op draws its own pattern. Shared by the GPU suite and the CPU benchmarks; values
    are drawn in ``dtype`` (no float64 copy).
    """
    fused = registry.get_op(op)
    if fused.bench is None:
        raise ValueError(f"fused op '{op}' registers no benchmark case")
    sizes = dict(B=B, T=T, H=H, heads=heads, layers=layers, ffn=ffn, k=k, dropout=dropout, keep_mask=keep_mask,
                 vocab=vocab)
    kwargs, shape, *rest = fused.bench(sizes)
    call_override = rest[0] if rest else None  # call(ops, *args): e.g. dropout drawing its own pattern
    spec = CaseSpec(op, **{"dtype": dtype, "seed": seed, **kwargs})
    case = build(spec, device, exact=False)
    ins = case.tensors()
    leaves = [t for t, d in zip(ins, case.differentiable) if d]
    fixed = {i: t for i, (t, d) in enumerate(zip(ins, case.differentiable)) if not d}

    def call(ops, *xs):
        it = iter(xs)
        args = [fixed[i] if i in fixed else next(it) for i in range(len(ins))]
        return (call_override or case.call)(ops, *args)

    return shape, leaves, call
