"""GPU suite for the Triton kernels: correctness vs the eager references, then timings.

Run (one H200, < 8 min; --quick for a ~1 min smoke run):

    python -m benchmarks.gpu_suite --out benchmarks/results/gpu-$(date +%Y%m%d-%H%M) --dtype bf16

Every registered fused op (``nasfast.kernels.registry``) is covered; an op the triton backend does not
implement gets one row saying so (it runs the eager reference).

1. correctness: each Triton op (forward, every gradient, no-grad forward) vs a float64 evaluation
   of the eager reference, by the rule of ``nasfast.kernels.cases.judge``
   (|triton - fp64| <= 3 |eager - fp64| + floor, plus attention's documented rounding allowance), on
   the shared layout cases (every tensor argument, weights and biases included, transposed / strided
   / offset / permuted / broadcast, at awkward sizes) and one realistic padded case per op, in fp32,
   fp16 and bf16; one row per case (its worst output);
2. timings with ``triton.testing.do_bench`` (median, p20, p80; forward and forward+backward) of
   triton vs eager reference vs ``torch.compile(reference)`` at the tiny (H=128) and base (H=768,
   T=512, B=32) widths, plus peak memory;
3. one whole supernet training step per backend, if ``nasfast.space.supernet`` imports;
4. the CPU table of ``benchmarks/vs_transformers.py`` (BertForMaskedLM eager / torch.compile vs the
   nasfast child and static model per backend, GEMM fraction) in bf16 at H=128 and 512, and the MFU
   of a base-space child step (H=768, 12 BERT layers), written to vs_transformers_gpu.{md,json}.
Writes ``results.csv`` and ``results.md`` (with the machine description and command line) to --out.
The CPU-side parts (argument parsing, machine description, result writing) are tested in
tests/test_gpu_suite_cpu.py.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

from nasfast.kernels.registry import get_op, get_ops, op_names

OPS = op_names()  # every registered fused op
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
WIDTHS = {  # shapes follow configs/tiny.yaml and configs/base.yaml
    "tiny": dict(B=32, T=128, H=128, heads=4, ffn=512, layers=6),
    "base": dict(B=32, T=512, H=768, heads=12, ffn=3072, layers=24),
}
QUICK_WIDTHS = {
    "tiny": dict(B=8, T=128, H=128, heads=4, ffn=512, layers=6),
    "base": dict(B=8, T=256, H=768, heads=12, ffn=3072, layers=12),
}
CSV_FIELDS = ("section", "op", "width", "shape", "dtype", "impl", "mode", "median_ms", "p20_ms", "p80_ms",
              "peak_mem_mb", "speedup_vs_eager", "max_err", "eager_err", "ok", "note")


@dataclass
class Row:
    section: str            # correctness | kernel | step
    op: str
    width: str = ""
    shape: str = ""
    dtype: str = ""
    impl: str = ""          # triton | eager | compiled
    mode: str = ""          # fwd | fwd+bwd | output/grad name for correctness
    median_ms: Optional[float] = None
    p20_ms: Optional[float] = None
    p80_ms: Optional[float] = None
    peak_mem_mb: Optional[float] = None
    speedup_vs_eager: Optional[float] = None
    max_err: Optional[float] = None
    eager_err: Optional[float] = None
    ok: Optional[bool] = None
    note: str = ""


# ---------------------------------------------------------------------------- CPU-side helpers
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Triton kernels vs eager vs torch.compile on one GPU")
    p.add_argument("--out", type=Path, default=None, help="output folder (default benchmarks/results/gpu-<time>)")
    p.add_argument("--quick", action="store_true", help="smaller shapes and fewer repetitions (~1 min)")
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {','.join(OPS)}")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="I/O dtype of the timed cases")
    p.add_argument("--widths", default="tiny,base", help="comma-separated subset of tiny,base")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile(reference) baseline")
    p.add_argument("--no-step", action="store_true", help="skip the whole-supernet training step")
    p.add_argument("--no-vs-transformers", action="store_true",
                   help="skip benchmarks/vs_transformers.py's table (bf16) and the base-space MFU step")
    args = p.parse_args(argv)
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    bad = [o for o in ops if o not in OPS]
    if bad or not ops:
        p.error(f"--ops: unknown op(s) {bad} (choose from {', '.join(OPS)})")
    widths = [w.strip() for w in args.widths.split(",") if w.strip()]
    if not widths or any(w not in WIDTHS for w in widths):
        p.error(f"--widths: choose from {', '.join(WIDTHS)}")
    args.ops, args.widths = ops, widths
    if args.out is None:
        args.out = Path("benchmarks/results") / f"gpu-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    return args


def machine_description() -> dict:
    """GPU, versions and host; works without CUDA (gpu is None then)."""
    from benchmarks.harness import describe

    return describe()


def command_line(argv=None) -> str:
    """``python -m benchmarks.gpu_suite ARGS`` (``argv``: the arguments after the program, for tests)."""
    from benchmarks.harness import command_line as running

    return running() if argv is None else " ".join(["python", "-m", "benchmarks.gpu_suite", *argv])


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-2 and v != 0 else f"{v:.3f}"
    return str(v)


def write_results(rows: list, out: Path, machine: dict, cmdline: str) -> tuple[Path, Path]:
    """results.csv (one row per measurement) and results.md (machine, command, tables)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out / "results.csv", out / "results.md"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if v is None else v) for k, v in asdict(r).items()})
    lines = ["# nasfast GPU suite", "", f"Command: `{cmdline}`", "", "| machine | |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in machine.items()]
    sections = [
        ("correctness", "Correctness (max abs error vs fp64 reference)",
         ("op", "shape", "dtype", "mode", "max_err", "eager_err", "ok", "note")),
        ("kernel", "Kernel timings (ms, do_bench median [p20, p80])",
         ("op", "width", "shape", "dtype", "mode", "impl", "median_ms", "p20_ms", "p80_ms", "peak_mem_mb",
          "speedup_vs_eager", "note")),
        ("step", "Supernet training step (ms)",
         ("op", "width", "shape", "dtype", "impl", "median_ms", "p20_ms", "p80_ms", "peak_mem_mb", "speedup_vs_eager", "note")),
    ]
    for key, title, cols in sections:
        sel = [r for r in rows if r.section == key]
        if not sel:
            continue
        lines += ["", f"## {title}", "", "| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
        for r in sel:
            d = asdict(r)
            lines.append("| " + " | ".join(_fmt(d[c]) for c in cols) + " |")
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


# ------------------------------------------------------------------------------- GPU-side parts
def _cases(op: str, w: dict, dtype, device, seed: int = 0):
    """(shape string, inputs that get gradients, call(ops_module, *inputs)) for one op at width w."""
    from nasfast.kernels.cases import bench_inputs

    return bench_inputs(op, w["B"], w["T"], w["H"], w["heads"], w["layers"], w["ffn"], dtype, device, seed=seed)


def correctness_specs(ops: list, dtype) -> list:
    """What the correctness section checks: the shared layout cases (every tensor argument and the
    incoming gradient in each non-contiguous layout, regressions of past bugs) and one realistic
    padded case per op, from nasfast.kernels.cases, restricted to ``ops``."""
    from nasfast.kernels.cases import CaseSpec, layout_cases

    # one realistic padded case per op: its benchmark case at small sizes
    sizes = dict(B=3, T=37, H=72, heads=3, layers=3, ffn=200, k=5, dropout=0.1, keep_mask=True, vocab=301)
    small = [CaseSpec(op, **{**get_op(op).bench(sizes)[0], "dtype": dtype, "seed": 1})
             for op in ops if get_op(op).bench is not None]
    return small + layout_cases(dtype, ops)


def check_correctness(ops: list, rows: list, device: str = "cuda") -> bool:
    """Triton vs the fp64 rule of nasfast.kernels.cases.judge: one row per case, its worst check."""
    import torch

    from nasfast.kernels import cases

    triton = get_ops("triton", device)
    for op in ops:
        if op not in triton.fused:
            rows.append(Row("correctness", op, impl="triton", note="not implemented by triton: eager reference"))
    ops = [op for op in ops if op in triton.fused]
    all_ok = True
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        dname = str(dtype).split(".")[-1]
        for spec in correctness_specs(ops, dtype):
            try:
                checks = cases.judge(cases.build(spec, device), triton)
                worst = max(checks, key=lambda c: (not c.ok, c.err / max(c.allowed, 1e-30)))
                ok = all(c.ok for c in checks)
                note = "; ".join(cases.failures(checks))[:300]
                rows.append(Row("correctness", spec.op, "", spec.describe(), dname, "triton", worst.name,
                                max_err=worst.err, eager_err=worst.eager_err, ok=ok, note=note))
            except Exception as exc:  # record and go on: one broken op must not hide the others
                ok = False
                rows.append(Row("correctness", spec.op, "", spec.describe(), dname, "triton", "", ok=False,
                                note=f"{type(exc).__name__}: {exc}"[:300]))
                traceback.print_exc()
            all_ok &= ok
            if not ok:
                print(f"[correctness] FAIL {spec.describe()}: {rows[-1].note}", flush=True)
    return all_ok


def _bench(fn: Callable, quick: bool):
    import torch
    import triton

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    peak = torch.cuda.max_memory_allocated() / 2**20
    q = triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=30 if quick else 100, quantiles=[0.5, 0.2, 0.8])
    return q[0], q[1], q[2], peak


def time_kernels(args, rows: list) -> None:
    import torch

    dtype = getattr(torch, DTYPES[args.dtype])
    eager, triton = get_ops("eager"), get_ops("triton", "cuda")
    compiled = None
    if not args.no_compile:
        compiled = {op: torch.compile(get_op(op).reference, dynamic=False) for op in args.ops}
    widths = QUICK_WIDTHS if args.quick else WIDTHS
    for width in args.widths:
        for op in args.ops:
            shape, inputs, call = _cases(op, widths[width], dtype, "cuda")
            impls = {"eager": eager}
            if op in triton.fused:
                impls["triton"] = triton
            else:
                rows.append(Row("kernel", op, width, shape, args.dtype, "triton", note="not implemented by triton"))
            if compiled is not None:
                impls["compiled"] = type("C", (), {op: staticmethod(compiled[op])})
            eager_ms = {}
            for impl, mod in impls.items():
                for mode in ("fwd", "fwd+bwd"):
                    try:
                        if mode == "fwd":
                            def fn():
                                with torch.no_grad():
                                    call(mod, *inputs)
                        else:
                            def fn():
                                out = call(mod, *inputs)
                                torch.autograd.backward(out, torch.ones_like(out))
                                for t in inputs:
                                    t.grad = None
                        med, p20, p80, peak = _bench(fn, args.quick)
                        if impl == "eager":
                            eager_ms[mode] = med
                        rows.append(Row("kernel", op, width, shape, args.dtype, impl, mode, med, p20, p80, peak,
                                        eager_ms.get(mode, med) / med if mode in eager_ms else None))
                    except Exception as exc:
                        rows.append(Row("kernel", op, width, shape, args.dtype, impl, mode,
                                        note=f"{type(exc).__name__}: {exc}"[:200]))
                        traceback.print_exc()
                    print(f"[kernel] {op:24s} {width:5s} {impl:9s} {mode:8s} "
                          f"{_fmt(rows[-1].median_ms):>9s} ms {rows[-1].note}", flush=True)
            torch.cuda.empty_cache()


def time_supernet_step(args, rows: list) -> None:
    """One forward+backward+optimizer step of a child of the supernet, per backend."""
    import torch

    try:
        from nasfast.config import load_config
        from nasfast.space.searchspace import SearchSpace
        from nasfast.space.supernet import Supernet
    except Exception as exc:  # being written elsewhere: skip cleanly
        rows.append(Row("step", "supernet", note=f"skipped: nasfast.space.supernet not importable ({exc})"[:200]))
        return
    dtype = getattr(torch, DTYPES[args.dtype])
    widths = QUICK_WIDTHS if args.quick else WIDTHS
    for width in args.widths:
        w = widths[width]
        try:
            cfg = load_config(f"configs/{width}.yaml" if Path(f"configs/{width}.yaml").exists() else None, [])
            cfg.model.hidden = w["H"]
            cfg.model.max_len = max(cfg.model.max_len, w["T"])
            space = SearchSpace.from_names(cfg.space.layers, cfg.space.candidates, cfg.model.hidden)
            vocab = cfg.data.vocab_size
            B, T = w["B"], w["T"]
            g = torch.Generator().manual_seed(0)
            ids = torch.randint(0, vocab, (B, T), generator=g).cuda()
            mask = torch.ones(B, T, dtype=torch.long)
            mask[1:, T * 3 // 4:] = 0
            mask = mask.cuda()
            labels = torch.full((B, T), -100, dtype=torch.long)
            pick = torch.rand(B, T, generator=g) < 0.15
            labels[pick] = torch.randint(0, vocab, (int(pick.sum()),), generator=g)
            labels = labels.cuda()
            arch = space.largest()
        except Exception as exc:
            rows.append(Row("step", "supernet", width, note=f"setup failed: {type(exc).__name__}: {exc}"[:200]))
            traceback.print_exc()
            continue
        eager_ms = None
        for backend in ("eager", "triton"):
            try:
                torch.manual_seed(0)
                net = Supernet(cfg.model, space, vocab, backend=backend).cuda()
                net.set_backend(backend, "cuda")
                params = net.child_parameters(arch)
                opt = torch.optim.AdamW(params, lr=1e-4, fused=True)

                def step(net=net, opt=opt):  # bound now: the loop rebinds both
                    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
                        out = net(ids, mask, arch, labels)
                    out.loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)

                med, p20, p80, peak = _bench(step, args.quick)
                eager_ms = med if backend == "eager" else eager_ms
                rows.append(Row("step", "supernet", width, f"B={B} T={T} H={w['H']} L={len(arch)} largest child",
                                args.dtype, backend, "train step", med, p20, p80, peak,
                                (eager_ms / med) if eager_ms else None))
                del net, opt
                torch.cuda.empty_cache()
            except Exception as exc:
                rows.append(Row("step", "supernet", width, "", args.dtype, backend, note=f"{type(exc).__name__}: {exc}"[:200]))
                traceback.print_exc()
            print(f"[step] {width} {backend}: {_fmt(rows[-1].median_ms)} ms {rows[-1].note}", flush=True)


PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}  # dense, vendor data sheets


def time_vs_transformers(args, rows: list) -> None:
    """Section 4: vs_transformers.py on this GPU in bf16, and the MFU of a base-space child step."""
    import statistics

    import torch

    try:
        import vs_transformers

        from benchmarks.step_models import StepConfig, make_batch, nasfast_steps

        res = vs_transformers.main(["--device", "cuda", "--dtype", "bf16", "--hidden", "128,512",
                                    "--rounds", "2" if args.quick else "3", "--steps", "3", "--warmup", "2",
                                    "--gemm-n", "8192", "--compile-timeout", "150", "--out", str(args.out),
                                    "--name", "vs_transformers_gpu"])
        for sec in res["sections"]:
            for r in sec["rows"]:
                rows.append(Row("step", r["name"], f"H{sec['hidden']}", "B=32 T=128 3 BERT layers", "bf16",
                                r.get("backend", "hf"), "train step", r["step_s"] * 1e3,
                                note=f"GEMM fraction {r['gemm_fraction']:.2f}; {r['tokens_per_s']:.0f} tok/s; "
                                     f"{r['speedup_vs_hf']:.2f}x HF eager"))
        name = torch.cuda.get_device_name(0)
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
        sc = StepConfig(hidden=768, bert_layers=12, heads=12, device="cuda", amp="bf16")
        batch = make_batch(sc, "cuda")
        for step in nasfast_steps(sc, batch, ["triton"])[:1]:
            for _ in range(3):
                step.run()
            times = []
            for _ in range(3 if args.quick else 8):
                t0 = time.perf_counter()
                step.run()  # returns float(loss): synchronises
                times.append(time.perf_counter() - t0)
            t = statistics.median(times)
            mfu = step.flops / t / (peak * 1e12) if peak else None
            rows.append(Row("step", "base-space child MFU", "base", "H=768 12 BERT layers B=32 T=128", "bf16",
                            "triton", "train step", t * 1e3,
                            note=f"{step.flops / t / 1e12:.1f} TFLOP/s; MFU {mfu:.3f} of {peak} TFLOP/s" if mfu
                            else f"{step.flops / t / 1e12:.1f} TFLOP/s (peak of {name} unknown)"))
    except Exception as exc:
        rows.append(Row("step", "vs_transformers", note=f"{type(exc).__name__}: {exc}"[:200]))
        traceback.print_exc()


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    machine_description()  # imports benchmarks/harness.py, which tunes malloc before anything is timed

    if not torch.cuda.is_available():
        print("gpu_suite: no CUDA device; nothing to run (the CPU-side parts are tested in tests/test_gpu_suite_cpu.py)")
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 comparisons stay exact on both sides
    start = time.time()
    rows: list = []
    ok = check_correctness(args.ops, rows)
    print(f"correctness: {'all ok' if ok else 'FAILURES'} ({time.time() - start:.0f} s)", flush=True)
    time_kernels(args, rows)
    if not args.no_step:
        time_supernet_step(args, rows)
    if not args.no_vs_transformers:
        time_vs_transformers(args, rows)
    machine = machine_description()
    machine["wall_s"] = round(time.time() - start, 1)
    csv_path, md_path = write_results(rows, args.out, machine, command_line(argv))
    print(f"wrote {csv_path} and {md_path} in {time.time() - start:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
