"""Analysis of the MAGIC test (protocol: results/magic_test/protocol.md), from whatever is complete.

    python -m experiments.magic_test analyze

Reads the ground-truth cache entries, the estimates and the run records under
``experiments/results/magic_test`` and writes ``results.json``, ``table.md`` and the plots there.
Every statistic follows the pre-registered protocol; parts whose inputs are missing are reported as
missing, never filled in.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Optional

import numpy as np
from scipy import stats

MAIN = ("spos", "magic-t", "magic-a", "magic")
METHODS = ("magic-t", "magic-a", "magic")


def kendall(x, y) -> Optional[float]:
    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return None
    return float(stats.kendalltau(x, y).statistic)


def spearman(x, y) -> Optional[float]:
    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return None
    return float(stats.spearmanr(x, y).statistic)


def load_truth(results: Path, child_set: str, seeds=(0, 1)) -> dict[int, dict[str, float]]:
    """{seed: {arch: dev loss}} from the per-child cache entries (diverged children left out)."""
    out = {}
    for seed in seeds:
        cache = results / "ground_truth" / f"{child_set}-s{seed}" / "cache"
        rows = [json.loads(p.read_text()) for p in sorted(cache.glob("*.json"))] if cache.is_dir() else []
        out[seed] = {r["arch"]: r["loss"] for r in rows if not r["diverged"]}
    return out


def mean_truth(truth: dict[int, dict[str, float]], archs: list[str]) -> tuple[dict[str, float], int]:
    """Mean over the seeds that have every child of ``archs``; returns (truth, number of seeds used)."""
    complete = [s for s, t in truth.items() if all(a in t for a in archs)]
    if not complete:
        return {}, 0
    return {a: statistics.fmean(truth[s][a] for s in complete) for a in archs}, len(complete)


def load_estimates(results: Path) -> dict[str, dict]:
    out = {}
    for p in sorted((results / "estimates").glob("*.json")):
        est = json.loads(p.read_text())
        out[p.stem] = {r["arch"]: r["loss"] for r in est["results"]}
    return out


def tau_on(est: dict[str, float], truth: dict[str, float], archs: list[str]) -> dict:
    x = [est[a] for a in archs]
    y = [truth[a] for a in archs]
    return {"kendall": kendall(x, y), "spearman": spearman(x, y), "n": len(archs)}


def bootstrap_delta(est: dict[str, dict], truth: dict[str, float], archs: list[str], method: str, seeds: list[int],
                    reps: int, rng: np.random.Generator) -> dict:
    """Two-level percentile bootstrap of mean Δτ = τ(method) − τ(spos): seeds × children, paired."""
    truth_v = np.array([truth[a] for a in archs])
    m = {s: np.array([est[f"{method}-s{s}"][a] for a in archs]) for s in seeds}
    b = {s: np.array([est[f"spos-s{s}"][a] for a in archs]) for s in seeds}
    deltas = np.array([kendall(m[s], truth_v) - kendall(b[s], truth_v) for s in seeds])
    boots = []
    n = len(archs)
    for _ in range(reps):
        ss = rng.choice(seeds, size=len(seeds), replace=True)
        idx = rng.integers(0, n, size=n)
        t = truth_v[idx]
        d = [stats.kendalltau(m[s][idx], t).statistic - stats.kendalltau(b[s][idx], t).statistic for s in ss]
        boots.append(np.nanmean(d))
    lo, hi = np.percentile(boots, [2.5, 97.5])
    se = float(deltas.std(ddof=1) / np.sqrt(len(deltas))) if len(deltas) > 1 else None
    verdict = "helps" if lo > 0 else "hurts" if hi < 0 else "no detectable difference"
    return {"per_seed": dict(zip(map(str, seeds), deltas.round(4).tolist())), "mean": float(deltas.mean()), "se": se,
            "ci95": [float(lo), float(hi)], "detectable_effect": float(hi - lo), "verdict": verdict, "seeds": len(seeds)}


def resolvable_pairs_tau(est: dict[str, float], truth: dict[int, dict[str, float]], archs: list[str]) -> Optional[dict]:
    """Kendall-style τ over the pairs whose mean ground truths differ by > 2 replicate SEs of a difference."""
    if not all(a in truth.get(1, {}) and a in truth.get(0, {}) for a in archs):
        return None
    diffs = np.array([truth[0][a] - truth[1][a] for a in archs])
    sigma = float(np.sqrt(np.mean(diffs ** 2) / 2))  # per-seed noise of one child's loss
    se_diff = sigma  # SE of a difference of two 2-seed means: sqrt(2 * sigma^2 / 2)
    mean = {a: (truth[0][a] + truth[1][a]) / 2 for a in archs}
    concordant = discordant = 0
    for i, a in enumerate(archs):
        for b in archs[i + 1:]:
            if abs(mean[a] - mean[b]) <= 2 * se_diff:
                continue
            s = np.sign(mean[a] - mean[b]) * np.sign(est[a] - est[b])
            concordant += s > 0
            discordant += s < 0
    pairs = concordant + discordant
    return {"tau": (concordant - discordant) / pairs if pairs else None, "pairs": int(pairs),
            "of": len(archs) * (len(archs) - 1) // 2, "seed_sigma": sigma}


def proxies(space, archs: list[str], truth: dict[str, float]) -> dict:
    """Zero-cost floors: τ of ground truth with simple architecture rules (lower loss predicted = larger rule)."""
    from nasfast.space.supernet import child_num_params

    def ops(a):
        return a.split("|")

    rules = {
        "context_layers": lambda a: -sum(o.startswith(("conv:", "mha:")) for o in ops(a)),
        "conv_layers": lambda a: -sum(o.startswith("conv:") for o in ops(a)),
        "params": lambda a: -child_num_params(space, space.parse(a), 4096, 64),
        "has_conv_then_fewer_identity": lambda a: -(100 * any(o.startswith("conv:") for o in ops(a)) - sum(o == "identity" for o in ops(a))),
    }
    y = [truth[a] for a in archs]
    return {name: kendall([rule(a) for a in archs], y) for name, rule in rules.items()}


def update_counts(space, sampler: str, seed: int, steps: int, walk: str) -> dict:
    from nasfast.space.samplers import build_sampler

    s = build_sampler(sampler, space, seed, walk=walk) if sampler in ("magic-t", "magic") else build_sampler(sampler, space, seed)
    counts = np.zeros((space.num_layers, len(space.candidates)), dtype=int)
    for step in range(steps):
        for layer, cand in enumerate(s.sample(step)):
            counts[layer, cand] += 1
    return {"min": int(counts.min()), "max": int(counts.max()), "counts": counts.tolist()}


def plots(results: Path, report: dict, est: dict, truth_hard: dict, hard: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # τ by sampler (hard set), seeds as dots, bars: mean with a 95% CI (± 1.96 SE over seeds)
    order = {n: i for i, n in enumerate(MAIN)}
    names = sorted((n for n in report["tau_by_config"] if report["tau_by_config"][n]["hard"]["per_seed"]),
                   key=lambda n: (order.get(n, len(order)), n))
    if names:
        fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(names) + 1), 3.8))
        for i, n in enumerate(names):
            vals = [v for v in report["tau_by_config"][n]["hard"]["per_seed"].values() if v is not None]
            mean = float(np.mean(vals))
            se = float(np.std(vals, ddof=1) / np.sqrt(len(vals))) if len(vals) > 1 else 0.0
            ax.bar(i, mean, yerr=1.96 * se, capsize=4, color="#9bb7d4",
                   label="mean, 95% CI (± 1.96 SE over seeds)" if i == 0 else None)
            ax.scatter([i] * len(vals), vals, color="k", s=10, zorder=3, label="one seed" if i == 0 else None)
        if report.get("ceiling_hard") is not None:
            ax.axhline(report["ceiling_hard"], color="g", ls="--", lw=1, label="GT replicate τ (ceiling)")
        for name, v in (report.get("floors_hard") or {}).items():
            if name == "context_layers" and v is not None:
                ax.axhline(v, color="r", ls=":", lw=1, label="zero-cost floor (context layers)")
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set(ylabel="Kendall τ vs mean ground truth", title="hard set (40 children with a conv layer)")
        ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        fig.savefig(results / "tau_by_sampler.png", dpi=120)
        plt.close(fig)
    # Δτ per seed with bootstrap CIs
    deltas = report.get("delta_tau_hard") or {}
    if deltas:
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        for i, (m, d) in enumerate(deltas.items()):
            per = list(d["per_seed"].values())
            ax.scatter([i] * len(per), per, color="k", s=12, zorder=3)
            ax.errorbar([i + 0.15], [d["mean"]], yerr=[[d["mean"] - d["ci95"][0]], [d["ci95"][1] - d["mean"]]], fmt="o",
                        color="C3", capsize=5, label="mean, 95% bootstrap CI" if i == 0 else None)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xticks(range(len(deltas)), list(deltas))
        ax.set(ylabel="Δτ vs spos (same seed)", title="per-seed Δτ, hard set")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(results / "delta_tau.png", dpi=120)
        plt.close(fig)
    # estimates vs truth, seed 0
    shown = [s for s in MAIN if f"{s}-s0" in est]
    if shown and truth_hard:
        fig, axes = plt.subplots(1, len(shown), figsize=(3.2 * len(shown), 3.2), squeeze=False)
        for ax, s in zip(axes[0], shown):
            e = est[f"{s}-s0"]
            ax.scatter([truth_hard[a] for a in hard], [e[a] for a in hard], s=10)
            ax.set(title=f"{s} seed 0", xlabel="ground truth (mean of seeds)", ylabel="inherited-weight estimate")
        fig.tight_layout()
        fig.savefig(results / "estimates_vs_truth.png", dpi=120)
        plt.close(fig)
    # per-operator update counts
    counts = report.get("update_counts") or {}
    if counts:
        fig, ax = plt.subplots(figsize=(6, 3.4))
        for i, (name, c) in enumerate(counts.items()):
            flat = np.array(c["counts"]).ravel()
            ax.scatter(np.full(len(flat), i) + np.random.default_rng(0).uniform(-0.15, 0.15, len(flat)), flat, s=8)
        ax.set_xticks(range(len(counts)), list(counts), rotation=20, ha="right")
        ax.set(ylabel="updates per (layer, candidate)", title="3000 steps, seed 0")
        fig.tight_layout()
        fig.savefig(results / "update_counts.png", dpi=120)
        plt.close(fig)


def analyze(results: Path, reps: int = 4000) -> dict:
    from benchmarks.harness import describe
    from nasfast.config import load_config
    from nasfast.space.checks import build_space

    cfg = load_config(results / "config.yaml")
    space = build_space(cfg)
    hard = (results / "archs_hard.txt").read_text().split()
    easy = (results / "archs_easy.txt").read_text().split()
    truth = {"hard": load_truth(results, "hard"), "easy": load_truth(results, "easy")}
    est = load_estimates(results)
    report: dict = {"protocol": "protocol.md", "missing": []}
    gt_mean = {}
    for child_set, archs in (("hard", hard), ("easy", easy)):
        gt_mean[child_set], n_seeds = mean_truth(truth[child_set], archs)
        report[f"ground_truth_{child_set}"] = {"seeds_complete": n_seeds,
                                               "children_per_seed": {str(s): len(t) for s, t in truth[child_set].items()}}
        if n_seeds < 2:
            report["missing"].append(f"ground truth {child_set}: {n_seeds} of 2 seeds complete")
    # ceiling and floors
    for child_set, archs in (("hard", hard), ("easy", easy)):
        th = truth[child_set]
        complete = 0 in th and 1 in th and all(a in th[0] and a in th[1] for a in archs)
        report[f"ceiling_{child_set}"] = kendall([th[0][a] for a in archs], [th[1][a] for a in archs]) if complete else None
    if gt_mean["hard"]:
        report["floors_hard"] = proxies(space, hard, gt_mean["hard"])
        vals = np.array([gt_mean["hard"][a] for a in hard])
        report["truth_spread_hard"] = {"min": float(vals.min()), "max": float(vals.max()), "sd": float(vals.std(ddof=1))}
    if gt_mean["easy"]:
        report["floors_easy"] = proxies(space, easy, gt_mean["easy"])
    # τ for every configuration, per seed
    configs: dict[str, dict] = {}
    for name in est:
        base, _, seed = name.rpartition("-s")
        configs.setdefault(base, {})[int(seed)] = name
    report["tau_by_config"] = {}
    for base, by_seed in sorted(configs.items()):
        row = {}
        for child_set, archs in (("hard", hard), ("easy", easy)):
            per_seed = {str(s): tau_on(est[n], gt_mean[child_set], archs) for s, n in sorted(by_seed.items())} if gt_mean[child_set] else {}
            taus = [v["kendall"] for v in per_seed.values() if v["kendall"] is not None]
            rhos = [v["spearman"] for v in per_seed.values() if v["spearman"] is not None]
            row[child_set] = {"per_seed": {s: v["kendall"] for s, v in per_seed.items()},
                              "spearman_per_seed": {s: v["spearman"] for s, v in per_seed.items()},
                              "kendall_mean": statistics.fmean(taus) if taus else None,
                              "kendall_sd": statistics.stdev(taus) if len(taus) > 1 else None,
                              "spearman_mean": statistics.fmean(rhos) if rhos else None}
            if child_set == "hard" and gt_mean["hard"]:
                rp = [resolvable_pairs_tau(est[n], truth["hard"], hard) for n in by_seed.values()]
                rp = [r for r in rp if r and r["tau"] is not None]
                row["hard"]["resolvable_pairs"] = {"tau_mean": statistics.fmean(r["tau"] for r in rp) if rp else None,
                                                   "pairs": rp[0]["pairs"] if rp else None, "of": rp[0]["of"] if rp else None,
                                                   "seed_sigma": rp[0]["seed_sigma"] if rp else None}
        configs_seeds = sorted(by_seed)
        row["seeds"] = configs_seeds
        report["tau_by_config"][base] = row
    # primary statistic
    rng = np.random.default_rng(20221)
    report["delta_tau_hard"] = {}
    if gt_mean["hard"]:
        for m in METHODS:
            seeds = [s for s in range(5) if f"{m}-s{s}" in est and f"spos-s{s}" in est]
            if len(seeds) >= 2:
                report["delta_tau_hard"][m] = bootstrap_delta(est, gt_mean["hard"], hard, m, seeds, reps, rng)
            if len(seeds) < 5:
                report["missing"].append(f"{m}: {len(seeds)} of 5 paired seeds")
        for walk_name in ("magic-t-balanced", "magic-balanced"):
            seeds = [s for s in range(5) if f"{walk_name}-s{s}" in est and f"spos-s{s}" in est]
            if len(seeds) >= 2:
                report["delta_tau_hard"][walk_name] = bootstrap_delta(est, gt_mean["hard"], hard, walk_name, seeds, reps, rng)
    # update counts and anchors
    steps = cfg.train.steps
    report["update_counts"] = {
        "spos": update_counts(space, "spos", 0, steps, "uniform"),
        "magic-t (uniform walk)": update_counts(space, "magic-t", 0, steps, "uniform"),
        "magic-t (balanced walk)": update_counts(space, "magic-t", 0, steps, "balanced"),
    }
    anchors = {}
    for p in sorted((results / "runs").glob("*.json")):
        info = json.loads(p.read_text())
        hist = info.get("anchor_history") or []
        if hist:
            changes = sum(bool(h["anchor_changed"]) for h in hist)
            anchors[p.stem] = {"replacements": changes, "final_anchor": hist[-1]["anchor"],
                               "final_in_hard_set_truth": gt_mean["hard"].get(hist[-1]["anchor"])}
    report["anchors"] = anchors
    interference = {}
    for p in sorted((results / "interference").glob("*/interference.json")):
        r = json.loads(p.read_text())
        interference[p.parent.name] = {"by_distance": r["by_distance"], "correlations": r["correlations"], "pairs": len(r["pairs"])}
    report["interference"] = interference
    report["machine"] = describe()
    (results / "results.json").write_text(json.dumps(report, indent=1))
    plots(results, report, est, gt_mean["hard"], hard)
    write_table(results / "table.md", report)
    print(f"-> {results}/results.json, table.md, *.png; missing: {report['missing'] or 'nothing'}")
    return report


def f(v, spec=".3f") -> str:
    return "n/a" if v is None else format(v, spec)


def write_table(path: Path, r: dict) -> None:
    lines = ["# MAGIC test: results (generated by `python -m experiments.magic_test analyze`)", "",
             "Protocol: `protocol.md` (committed before these results). Missing parts: "
             + ("; ".join(r["missing"]) if r["missing"] else "none") + ".", "",
             f"Ground truth: hard set seeds complete {r['ground_truth_hard']['seeds_complete']}/2; replicate τ (ceiling) "
             f"= {f(r['ceiling_hard'])}; spread {r.get('truth_spread_hard')}.", "",
             "Zero-cost floors (hard set, τ with mean ground truth): "
             + ", ".join(f"{k} {f(v)}" for k, v in (r.get("floors_hard") or {}).items()), "",
             f"Easy set: replicate τ (ceiling) = {f(r.get('ceiling_easy'))}; zero-cost floors: "
             + ", ".join(f"{k} {f(v)}" for k, v in (r.get("floors_easy") or {}).items()), "",
             "## Primary: per-seed Δτ = τ(method) − τ(spos), hard set", "",
             "| method | mean Δτ | SE | 95% bootstrap CI | per seed | verdict |", "|---|---|---|---|---|---|"]
    for m, d in r["delta_tau_hard"].items():
        lines.append(f"| {m} | {d['mean']:+.3f} | {f(d['se'])} | [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] | "
                     f"{', '.join(f'{v:+.3f}' for v in d['per_seed'].values())} | {d['verdict']} |")
    lines += ["", "## Kendall τ by configuration", "", "| config | seeds | hard τ mean ± sd | hard ρ mean | hard τ (resolvable pairs) | easy τ mean |",
              "|---|---|---|---|---|---|"]
    for name, row in r["tau_by_config"].items():
        h, e = row["hard"], row["easy"]
        rp = h.get("resolvable_pairs") or {}
        lines.append(f"| {name} | {len(row['seeds'])} | {f(h['kendall_mean'])} ± {f(h['kendall_sd'])} | {f(h['spearman_mean'])} | "
                     f"{f(rp.get('tau_mean'))} ({rp.get('pairs')}/{rp.get('of')} pairs) | {f(e['kendall_mean'])} |")
    lines += ["", "## Update counts per (layer, candidate), 3000 steps, seed 0", ""]
    for name, c in r["update_counts"].items():
        lines.append(f"- {name}: min {c['min']}, max {c['max']}")
    if r["anchors"]:
        lines += ["", "## Anchors", ""]
        for name, a in r["anchors"].items():
            lines.append(f"- {name}: {a['replacements']} replacements, final anchor {a['final_anchor']}")
    if r["interference"]:
        lines += ["", "## Interference (spos seed 0, layer 2)", ""]
        for name, it in r["interference"].items():
            c = it["correlations"]
            lines.append(f"- {name} ({it['pairs']} pairs): Spearman(d, grad cos) {f(c['distance_vs_grad_cos']['rho'], '+.3f')} "
                         f"(p {f(c['distance_vs_grad_cos']['p'], '.2g')}); input sim | d: partial ρ "
                         f"{f(c['input_sim_vs_grad_cos_given_d']['rho'], '+.3f')} (p {f(c['input_sim_vs_grad_cos_given_d']['p'], '.2g')}); "
                         f"output sim | d: partial ρ {f(c['output_sim_vs_grad_cos_given_d']['rho'], '+.3f')} "
                         f"(p {f(c['output_sim_vs_grad_cos_given_d']['p'], '.2g')})")
    lines += ["", "## Machine", "", "```", json.dumps(r["machine"], indent=1), "```", ""]
    path.write_text("\n".join(lines))
