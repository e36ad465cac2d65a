"""Rank correlation between inherited-weight estimates and ground truth (docs/protocols.md §5).

Results files (from ``nasfast evaluate`` and ``nasfast ground-truth``) are JSON objects with a
``results`` list of ``{"arch": <arch id>, "loss": ..., "accuracy": ..., ...}``; children are matched
by arch id. Lower loss is better in both, so a good supernet gives positive τ and ρ on loss.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

from nasfast.errors import UserError, warn

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
    """A results file, every value checked like a config value (one UserError line naming the file and the
    result); a NaN or infinite score is kept here and left out, with a warning, by ``rank_correlation``."""
    from nasfast.filevalues import load_json

    path = Path(path)
    if path.is_dir() and (path / "ground_truth.json").is_file():
        path = path / "ground_truth.json"
    if not path.is_file():
        raise UserError(f"results file not found: {path}")
    data = load_json(path, "results file")
    if not isinstance(data, dict) or not isinstance(data.get("results"), list):
        raise UserError(f"{path} has no 'results' list (expected output of nasfast evaluate or ground-truth)")
    seen: dict[str, dict] = {}
    for i, r in enumerate(data["results"]):
        _check_result(path, i, r)
        if r["arch"] in seen and any(_differ(seen[r["arch"]][m], r[m]) for m in METRICS):
            raise UserError(f"{path}: result {i} ({r['arch']}) is listed twice with different scores")
        seen[r["arch"]] = r
    data["file"] = str(path)
    return data


def _differ(a: float, b: float) -> bool:
    return not (a == b or (math.isnan(a) and math.isnan(b)))


def _check_result(path: Path, i: int, r: object) -> None:
    """One result: an arch string, a loss >= 0 and an accuracy in [0, 1] (or NaN / inf: left out later)."""
    from nasfast.filevalues import fail, is_number

    if not isinstance(r, dict):
        fail(path, f"result {i}", "an object with 'arch', 'loss' and 'accuracy'", r)
    if not isinstance(r.get("arch"), str) or not r["arch"].strip():
        fail(path, f"result {i}: arch", "an arch string", r.get("arch"))
    where = f"result {i} ({r['arch']})"
    for metric, lo, hi in (("loss", 0.0, math.inf), ("accuracy", 0.0, 1.0)):
        value = r.get(metric)
        if metric not in r or not is_number(value):
            fail(path, f"{where}: {metric}", "a number", value)
        if math.isfinite(value) and not lo <= value <= hi:
            fail(path, f"{where}: {metric}", f"a number in [{lo:g}, {hi:g}]", value)


def _finite(results: dict, metric: str) -> dict[str, dict]:
    """The results by arch whose ``metric`` is finite; says which ones were left out and why."""
    kept = {r["arch"]: r for r in results["results"] if math.isfinite(r[metric])}
    dropped = [r["arch"] for r in results["results"] if not math.isfinite(r[metric])]
    if dropped:
        shown = ", ".join(dropped[:3]) + (f" and {len(dropped) - 3} more" if len(dropped) > 3 else "")
        warn(f"{results.get('file', 'results')}: left out {len(dropped)} child(ren) whose {metric} is not a finite "
             f"number (NaN or inf: diverged or not scored): {shown}")
    return kept


def rank_correlation(estimates: dict, truth: dict, metric: str = "loss") -> dict:
    """Match children by arch id and correlate the estimated and true ``metric`` (non-finite scores left out)."""
    if metric not in METRICS:
        raise UserError(f"--metric must be one of {', '.join(METRICS)}, got '{metric}'")
    est, true = _finite(estimates, metric), _finite(truth, metric)
    common = [a for a in est if a in true]
    if len(common) < MIN_CHILDREN:
        left_out = len(estimates["results"]) - len(est) + len(truth["results"]) - len(true)
        why = f" after leaving out {left_out} non-finite score(s)" if left_out else ""
        raise UserError(f"only {len(common)} children with a finite {metric} are in both the estimates and the ground "
                        f"truth{why} (need >= {MIN_CHILDREN} for a rank correlation)")
    x = [est[a][metric] for a in common]
    y = [true[a][metric] for a in common]
    return {
        "metric": metric,
        "kendall": kendall(x, y),
        "spearman": spearman(x, y),
        "undefined": _undefined(x, y, metric),
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


def _undefined(x: Sequence[float], y: Sequence[float], metric: str) -> Optional[str]:
    """Why τ and ρ are undefined (printed beside the 'n/a'), or None."""
    for values, what in ((x, "estimate"), (y, "ground-truth")):
        if _constant(values):
            return f"every {what} {metric} is the same ({values[0]:g}): a rank correlation is undefined"
    return None


def check_same_dev(result: dict) -> None:
    dev = result["dev"]
    if dev["estimates"] and dev["truth"] and dev["estimates"] != dev["truth"]:
        warn(f"estimates and ground truth used different dev sets ({dev['estimates']} vs {dev['truth']})")
