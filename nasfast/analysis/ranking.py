"""Rank correlation between inherited-weight estimates and ground truth (docs/protocols.md §5).

Results files (from ``nasfast evaluate`` and ``nasfast ground-truth``) are JSON objects with a
``results`` list of ``{"arch": <arch id>, "loss": ..., "accuracy": ..., ...}``; children are matched
by arch id. Lower loss is better in both, so a good supernet gives positive τ and ρ on loss.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Sequence

from nasfast.errors import UserError

METRICS = ("loss", "accuracy")
MIN_CHILDREN = 3


def _clean(value: float) -> float | None:
    """A JSON-safe float: NaN (a constant input) becomes None."""
    value = float(value)
    return None if math.isnan(value) else value


def _constant(values: Sequence[float]) -> bool:
    return len(set(values)) < 2


def _correlation(test: str, key: str, x: Sequence[float], y: Sequence[float]) -> dict:
    """A scipy.stats rank correlation and its two-sided p-value (None when undefined, e.g. a constant input)."""
    from scipy import stats

    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"{test} needs two sequences of equal length >= 2")
    if _constant(x) or _constant(y):
        return {key: None, "p": None, "n": len(x)}
    res = getattr(stats, test)(x, y)
    return {key: _clean(res.statistic), "p": _clean(res.pvalue), "n": len(x)}


def spearman(x: Sequence[float], y: Sequence[float]) -> dict:
    """Spearman ρ and its two-sided p-value."""
    return _correlation("spearmanr", "rho", x, y)


def kendall(x: Sequence[float], y: Sequence[float]) -> dict:
    """Kendall τ-b (ties handled) and its two-sided p-value."""
    return _correlation("kendalltau", "tau", x, y)


def fmt(value: float | None, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def load_results(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir() and (path / "ground_truth.json").is_file():
        path = path / "ground_truth.json"
    if not path.is_file():
        raise UserError(f"results file not found: {path}")
    from nasfast.files import read_text

    try:
        data = json.loads(read_text(path, "results file"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON (line {exc.lineno})") from None
    if not isinstance(data, dict) or not isinstance(data.get("results"), list):
        raise UserError(f"{path} has no 'results' list (expected output of nasfast evaluate or ground-truth)")
    for i, r in enumerate(data["results"]):
        if not isinstance(r, dict) or not isinstance(r.get("arch"), str) or not all(isinstance(r.get(m), (int, float)) for m in METRICS):
            raise UserError(f"{path}: result {i} needs 'arch' (an arch string), 'loss' and 'accuracy' (numbers)")
    return data


def rank_correlation(estimates: dict, truth: dict, metric: str = "loss") -> dict:
    """Match children by arch id and correlate the estimated and true ``metric``."""
    if metric not in METRICS:
        raise UserError(f"--metric must be one of {', '.join(METRICS)}, got '{metric}'")
    est = {r["arch"]: r for r in estimates["results"]}
    true = {r["arch"]: r for r in truth["results"]}
    common = [a for a in est if a in true]
    if len(common) < MIN_CHILDREN:
        raise UserError(f"only {len(common)} children are in both the estimates and the ground truth (need >= {MIN_CHILDREN})")
    x = [est[a][metric] for a in common]
    y = [true[a][metric] for a in common]
    return {
        "metric": metric,
        "kendall": kendall(x, y),
        "spearman": spearman(x, y),
        "children": [{"arch": a, "estimate": est[a][metric], "truth": true[a][metric]} for a in common],
        "only_in_estimates": [a for a in est if a not in true],
        "only_in_truth": [a for a in true if a not in est],
        "dev": {"estimates": estimates.get("dev"), "truth": truth.get("dev")},
    }


def replicate_ceiling(truths: Sequence[dict], metric: str = "loss") -> dict:
    """Kendall τ between ground-truth replicates (the same children trained at different seeds),
    averaged over every pair of replicates: no estimate can rank better than the truth agrees with itself.

    ``tau`` is None with fewer than two replicates or no pair sharing ``MIN_CHILDREN`` children.
    """
    pairs = []
    for i in range(len(truths)):
        for j in range(i + 1, len(truths)):
            a = {r["arch"]: r[metric] for r in truths[i]["results"]}
            b = {r["arch"]: r[metric] for r in truths[j]["results"]}
            common = [arch for arch in a if arch in b]
            if len(common) >= MIN_CHILDREN:
                pairs.append(kendall([a[c] for c in common], [b[c] for c in common]))
    taus = [p["tau"] for p in pairs if p["tau"] is not None]
    return {"tau": sum(taus) / len(taus) if taus else None, "pairs": pairs}


def check_same_dev(result: dict) -> None:
    dev = result["dev"]
    if dev["estimates"] and dev["truth"] and dev["estimates"] != dev["truth"]:
        print(f"warning: estimates and ground truth used different dev sets ({dev['estimates']} vs {dev['truth']})", file=sys.stderr)
