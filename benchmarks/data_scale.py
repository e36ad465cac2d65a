"""Pretraining data at scale: prepare time, memory and loading overlap on ~20 MB, ~200 MB and ~1 GB corpora.

    python -m benchmarks.data_scale                       # all sizes, writes benchmarks/results/data_scale.{md,json}
    python -m benchmarks.data_scale --sizes 20 --steps 20 # a quick look

The corpora are the embedded corpus (nasfast/corpus, ~21 MB of text) decompressed and repeated to the
size asked (1x, 10x, 50x), written as plain .txt under --work (default /tmp/nasfast-data-scale; never
the repository). Repetition gives realistic token statistics but no new vocabulary, so every size uses
the same tokenizer, trained once (``data.tokenizer``): the prepare times below are reading +
tokenizing + writing, not WordPiece training.

For each size: ``nasfast prepare-data`` at --num-proc 1 and 2 (wall time, MB of text per second, peak
RSS from /usr/bin/time of the largest process), then a ``--steps``-step ``configs/tiny.yaml`` run on the
prepared data (peak RSS, time from command start until the first step is logged, and the share of the
training loop spent waiting for batches with ``data.prefetch`` off and on).
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.harness import describe

ROOT = Path(__file__).resolve().parents[1]

RESULTS = ROOT / "benchmarks" / "results"


def build_corpus(work: Path, mb: int) -> Path:
    folder = work / f"corpus_{mb}mb"
    target = mb * 1_000_000
    done = folder / "corpus.txt"
    if done.is_file() and done.stat().st_size >= target:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    text = b"".join(gzip.open(p).read() for p in sorted((ROOT / "nasfast" / "corpus").glob("*.txt.gz")))
    tmp = folder / ".corpus.txt.tmp"
    with open(tmp, "wb") as fh:
        written = 0
        while written < target:
            part = text[: target - written]
            cut = part.rfind(b"\n") + 1 if len(part) < len(text) else len(part)
            fh.write(part[:cut] if cut else part)
            written += cut if cut else len(part)
    tmp.rename(done)
    return folder


def timed(cmd: list[str], env: dict) -> dict:
    """Run ``cmd`` under /usr/bin/time -v: wall seconds, peak RSS (MiB), stdout."""
    started = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1)) / 1024
    return {"wall_s": wall, "peak_rss_mib": rss, "stdout": proc.stdout}


def train_run(prepared: Path, out: Path, steps: int, prefetch: bool, env: dict) -> dict:
    """A tiny run of ``steps`` steps: peak RSS, seconds from start until the first step is logged, data wait."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "nasfast", "pretrain", "--config", "configs/tiny.yaml", "--out", str(out), "--no-progress",
           "--set", f"data.prepared={prepared}", "--set", "data.copy_max_mb=0", "--set", f"train.steps={steps}",
           "--set", "train.log_every=1", "--set", f"train.warmup_steps={min(50, steps)}", "--set", f"train.eval_every={steps}", "--set", f"train.ckpt_every={steps}",
           "--set", f"data.prefetch={str(prefetch).lower()}"]
    started = time.perf_counter()
    proc = subprocess.Popen(["/usr/bin/time", "-v", *cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    first = None
    metrics = out / "metrics.jsonl"
    while proc.poll() is None:
        if first is None and metrics.is_file() and metrics.stat().st_size > 0:
            first = time.perf_counter() - started
        time.sleep(0.05)
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"training failed ({proc.returncode}): {stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr).group(1)) / 1024
    return {"peak_rss_mib": rss, "first_step_s": first, "wall_s": time.perf_counter() - started,
            "data_wait_share": summary["data_wait_share"], "data_wait_s": summary["data_wait_s"],
            "loop_tokens_per_s": summary["tokens_per_s"], "command": " ".join(cmd)}


def collate_cost(repeats: int = 20) -> dict:
    """Seconds to mask one tiny.yaml batch (32 x 128): transformers' collator (the synchronous path before)
    vs the vectorised masker drawing from a generator (what the loader thread runs now)."""
    import numpy as np
    import torch
    from transformers import DataCollatorForLanguageModeling

    from nasfast.data.blocks import mask_tokens
    from nasfast.data.prepare import load_tokenizer
    from nasfast.rng import torch_generator

    tok = load_tokenizer(Path("/tmp/nasfast-data-scale/tokenizer"))
    blocks = np.random.default_rng(0).integers(5, len(tok), (32, 128))
    collator = DataCollatorForLanguageModeling(tok, mlm=True, mlm_probability=0.15)
    special = torch.tensor(sorted(tok.all_special_ids))

    def best(fn) -> float:
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
        return min(times)

    old = best(lambda: collator([{"input_ids": b} for b in torch.from_numpy(blocks)]))
    new = best(lambda: mask_tokens(torch.from_numpy(blocks), torch_generator(1), 0.15, len(tok), tok.mask_token_id, special))
    return {"collator_s": old, "vectorised_s": new}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="20,200,1000", help="corpus sizes in MB (comma-separated)")
    ap.add_argument("--num-proc", default="1,2", help="--num-proc values to prepare with")
    ap.add_argument("--big-num-proc", default="2", help="--num-proc values for sizes >= 1000 MB (time on a shared machine)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--work", type=Path, default=Path("/tmp/nasfast-data-scale"))
    ap.add_argument("--out", type=Path, default=RESULTS / "data_scale")
    ap.add_argument("--note", default="", help="a sentence on the conditions of this measurement, kept in the results")
    ap.add_argument("--merge", action="store_true", help="keep saved rows of the sizes not given in --sizes")
    ap.add_argument("--collate-only", action="store_true", help="only (re)measure the masking cost; keep the saved rows")
    args = ap.parse_args()
    if args.collate_only:
        saved = json.loads(args.out.with_suffix(".json").read_text())
        write(args, saved["rows"], collate_cost(), saved["command"])
        return
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "NASFAST_CACHE": str(args.work / "cache")}
    args.work.mkdir(parents=True, exist_ok=True)
    tokenizer = args.work / "tokenizer"
    if not tokenizer.is_dir():  # one WordPiece vocabulary for every size (tiny.yaml's settings, the embedded corpus)
        subprocess.run([sys.executable, "-c", "from nasfast.config import load_config; from nasfast.data.prepare import train_tokenizer, "
                        "tokenizer_sample; from nasfast.data.sources import resolve_sources; c = load_config('configs/tiny.yaml').data; "
                        f"train_tokenizer(tokenizer_sample(resolve_sources(c.corpus), c), c.vocab_size, c.lowercase).save_pretrained('{tokenizer}')"],
                       check=True, env=env, cwd=ROOT)
    rows = []
    saved = args.out.with_suffix(".json")
    if args.merge and saved.is_file():  # keep the saved rows of sizes not measured in this invocation
        asked = {int(s) for s in args.sizes.split(",")}
        rows = [r for r in json.loads(saved.read_text())["rows"] if not any(abs(r["corpus_mb"] - a) < 0.1 * a for a in asked)]
    for mb in [int(s) for s in args.sizes.split(",")]:
        corpus = build_corpus(args.work, mb)
        size = (corpus / "corpus.txt").stat().st_size
        procs = args.big_num_proc if mb >= 1000 else args.num_proc
        row = {"size_mb": mb, "corpus_mb": round(size / 1e6, 1), "prepare": {}}
        prepared = None
        for n in [int(p) for p in procs.split(",")]:
            out = args.work / f"prepared_{mb}mb_np{n}"
            shutil.rmtree(out, ignore_errors=True)
            cmd = [sys.executable, "-m", "nasfast", "prepare-data", "--config", "configs/tiny.yaml", "--out", str(out),
                   "--num-proc", str(n), "--no-progress", "--set", f"data.corpus=[{corpus}]", "--set", "data.max_chars_per_file=null",
                   "--set", f"data.tokenizer={tokenizer}"]
            res = timed(cmd, env)
            manifest = json.loads((out / "manifest.json").read_text())
            row["prepare"][n] = {"wall_s": res["wall_s"], "mb_per_s": size / 1e6 / res["wall_s"], "peak_rss_mib": res["peak_rss_mib"],
                                 "train_blocks": manifest["train_blocks"], "tokens": manifest["tokens"],
                                 "token_mb": manifest["tokens"] * 2 / 1e6, "command": " ".join(cmd)}
            print(f"{mb} MB prepare np={n}: {res['wall_s']:.1f} s, {size / 1e6 / res['wall_s']:.2f} MB/s, "
                  f"peak RSS {res['peak_rss_mib']:.0f} MiB", flush=True)
            if prepared is not None:
                shutil.rmtree(prepared)  # keep one prepared copy per size on disk
            prepared = out
        row["train"] = {}
        for prefetch in (False, True):
            res = train_run(prepared, args.work / f"run_{mb}mb", args.steps, prefetch, env)
            row["train"]["prefetch" if prefetch else "sync"] = res
            print(f"{mb} MB train prefetch={prefetch}: peak RSS {res['peak_rss_mib']:.0f} MiB, first step {res['first_step_s']:.1f} s, "
                  f"data wait {100 * res['data_wait_share']:.2f}%", flush=True)
        rows.append(row)
        rows.sort(key=lambda r: r["corpus_mb"])
        shutil.rmtree(prepared)
        write(args, rows)
    write(args, rows, collate_cost())


def write(args, rows: list[dict], collate: dict | None = None, cmd: str | None = None) -> None:
    machine = describe()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    cmd = cmd or "python -m benchmarks.data_scale " + " ".join(sys.argv[1:])
    args.out.with_suffix(".json").write_text(
        json.dumps({"command": cmd, "machine": machine, "rows": rows, "masking": collate, "note": args.note}, indent=1) + "\n")
    lines = [
        "# Pretraining data at scale", "",
        f"Command: `{cmd}` (from the repository root). Machine: {machine['cpu_model']}, {machine['logical_cpus']} logical CPUs, "
        f"load average {machine['load_average_1_5_15min']} (shared with other jobs: times are noisy, memory is not).", "",
        "Corpora: the embedded corpus (~21 MB of text) repeated to each size, plain .txt. One tokenizer for all "
        "(trained once on the embedded corpus with configs/tiny.yaml's settings, passed as data.tokenizer), so "
        "prepare = read + tokenize + write blocks + split dev + hash. Training: configs/tiny.yaml on the prepared "
        f"data (memory-mapped, run folder references it), {args.steps} steps, eager backend, CPU.", "",
        *([f"Conditions: {args.note}", ""] if args.note else []),
        "| corpus | num-proc | prepare s | MB/s | prepare peak RSS MiB | tokens (M) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        for n, p in r["prepare"].items():
            lines.append(f"| {r['corpus_mb']} MB | {n} | {p['wall_s']:.1f} | {p['mb_per_s']:.2f} | {p['peak_rss_mib']:.0f} | {p['tokens'] / 1e6:.1f} |")
    lines += ["", f"Training, {args.steps} steps (synchronous loading = data.prefetch=false / prefetch = the default):", "",
              "| corpus | peak RSS MiB, sync | peak RSS MiB, prefetch | first step s, sync | first step s, prefetch "
              "| data wait, sync | data wait, prefetch |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        s, p = r["train"]["sync"], r["train"]["prefetch"]
        lines.append(f"| {r['corpus_mb']} MB | {s['peak_rss_mib']:.0f} | {p['peak_rss_mib']:.0f} | {s['first_step_s']:.1f} | "
                     f"{p['first_step_s']:.1f} | {100 * s['data_wait_share']:.2f}% | {100 * p['data_wait_share']:.2f}% |")
    small, big = rows[0], rows[-1]
    if big is not small:
        rss = [max(r["train"]["sync"]["peak_rss_mib"], r["train"]["prefetch"]["peak_rss_mib"]) for r in (small, big)]
        lines += ["", f"Goals: peak training RSS at {big['corpus_mb']} MB / at {small['corpus_mb']} MB = {rss[1] / rss[0]:.2f}x "
                  f"(goal <= 1.2x; the larger of the two runs each); first step at {big['corpus_mb']} MB "
                  f"{big['train']['prefetch']['first_step_s']:.1f} s (goal <= 10 s); data wait with prefetch "
                  f"{100 * max(r['train']['prefetch']['data_wait_share'] for r in rows):.2f}% at most (goal < 2%)."]
    lines += ["", "First step: seconds from starting `nasfast pretrain` until metrics.jsonl holds step 1 (start-up, model "
              "build, dev/anchor batches and one training step). Data wait: the share of the training loop's time spent "
              "in the loader's get (summary.json data_wait_share)."]
    if collate:
        lines += ["", f"Masking one 32 x 128 batch (best of 20): transformers' DataCollatorForLanguageModeling "
                  f"{1e3 * collate['collator_s']:.1f} ms (what the step ran synchronously before), the vectorised masker "
                  f"{1e3 * collate['vectorised_s']:.2f} ms (bitwise the same masks; now run on the loader thread)."]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
