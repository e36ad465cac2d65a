"""Interference on a shared operator (the paper's observations 1 and 2; docs/protocols.md §4).

Fix o = (layer i, candidate c). For base children containing o and partners that keep o and differ
from the base in exactly d OTHER layers, on the same fixed dev batches (eval mode, dropout off):
- gradient similarity cos(∇θ_o L(base), ∇θ_o L(partner)) over all of o's parameters, flattened;
- input similarity: cos of the hidden states entering layer i (real tokens, flattened);
- output similarity: cos of o's outputs.
Layers before i change o's input (and so everything after it); layers after i leave o's input and
output unchanged and change only the gradient flowing back into o. Each pair records how many of
its differing layers lie before and after i.
"""
from __future__ import annotations

import json
import random
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from nasfast.analysis.ranking import fmt, spearman
from nasfast.errors import UserError
from nasfast.files import atomic_write_text
from nasfast.space.searchspace import Arch, SearchSpace


@dataclass
class ChildPass:
    """What one child's pass over the dev batches gives for operator o."""

    loss: float
    grad: torch.Tensor  # ∇θ_o of the token-weighted dev loss, all of o's parameters flattened (fp64)
    input: torch.Tensor  # o's input at real tokens, flattened (fp64)
    output: torch.Tensor  # o's output at real tokens, flattened (fp64)


def cosine(a: torch.Tensor, b: torch.Tensor) -> Optional[float]:
    """cos(a, b) in fp64; exactly 1.0 when a == b (sqrt(x*x) == x in IEEE arithmetic); None for a zero vector."""
    a, b = a.double().flatten(), b.double().flatten()
    aa, bb = torch.dot(a, a), torch.dot(b, b)
    if aa == 0 or bb == 0:
        return None
    return max(-1.0, min(1.0, float(torch.dot(a, b) / torch.sqrt(aa * bb))))


def child_pass(model, arch: Arch, layer: int, batches: list[dict], device: torch.device) -> ChildPass:
    """Loss, ∇θ_o L, and o's input/output for ``arch`` on ``batches`` (model in eval mode)."""
    params = list(model.layers[layer][arch[layer]].parameters())
    total = sum(int((b["labels"] != -100).sum()) for b in batches)
    grads = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    inputs, outputs, loss_sum = [], [], 0.0
    with torch.enable_grad():
        for batch in batches:
            ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
            token_mask = mask.bool()
            x = model.embed(ids)
            states = model.run_layers(x, token_mask, arch)
            out = model.mlm_output(states, labels)
            weighted = out.loss * (out.num_masked / max(total, 1))  # token-weighted mean over all batches
            for acc, g in zip(grads, torch.autograd.grad(weighted, params, allow_unused=True)):
                if g is not None:
                    acc += g.double()
            loss_sum += float(weighted.detach())
            before = x if layer == 0 else states[layer - 1]
            inputs.append(before.detach()[token_mask].double().flatten())
            outputs.append(states[layer].detach()[token_mask].double().flatten())
    return ChildPass(loss_sum, torch.cat([g.flatten() for g in grads]), torch.cat(inputs), torch.cat(outputs))


def compare(base: ChildPass, other: ChildPass) -> dict:
    return {
        "grad_cos": cosine(base.grad, other.grad),
        "input_sim": cosine(base.input, other.input),
        "output_sim": cosine(base.output, other.output),
    }


def sample_partner(space: SearchSpace, base: Arch, layer: int, d: int, rng: random.Random) -> tuple[Arch, list[int]]:
    """A child that keeps ``base[layer]`` and differs from ``base`` in exactly ``d`` other layers."""
    changed = sorted(rng.sample([l for l in range(space.num_layers) if l != layer], d))
    arch = list(base)
    for l in changed:
        arch[l] = rng.choice([c for c in range(len(space.candidates)) if c != base[l]])
    return tuple(arch), changed


MAX_CHILDREN = 100_000


def check_request(space: SearchSpace, layer: int, candidate: str, distances: Optional[int], bases: int = 1,
                  partners_per_distance: int = 1) -> tuple[int, int]:
    """Validate (layer, candidate, D) against the space and the number of children it asks for, before any
    weights load; returns (candidate index, D)."""
    L = space.num_layers
    if not 0 <= layer < L:
        raise UserError(f"--layer {layer} is out of range: the space has layers 0..{L - 1}")
    names = space.names
    if candidate not in names:
        raise UserError(f"--candidate '{candidate}' is not in the space ({', '.join(names)})")
    choice = names.index(candidate)
    if space.candidates[choice].num_params(space.hidden) == 0:
        raise UserError(f"--candidate {candidate} has no parameters, so no gradient to compare")
    if len(space.candidates) < 2:
        raise UserError("the space has one candidate per layer: no partner can differ from the base")
    D = L - 1 if distances is None else distances
    if D < 1:
        raise UserError(f"--distances must be >= 1, got {D}")
    if D > L - 1:
        raise UserError(f"--distances {D} is larger than the {L - 1} other layers of a {L}-layer space (max {L - 1})")
    if bases < 1 or partners_per_distance < 1:
        raise UserError("--bases and --partners-per-distance must be >= 1")
    children = bases * (1 + D * partners_per_distance)
    if children > MAX_CHILDREN:  # each child is a forward and backward; the pairs' gradients are kept
        raise UserError(f"--bases {bases:,} x (1 + --distances {D} x --partners-per-distance {partners_per_distance:,}) = "
                        f"{children:,} children, more than the limit {MAX_CHILDREN:,} (a typo?)")
    return choice, D


def measure(
    model, space: SearchSpace, layer: int, candidate: str, batches: list[dict], device: torch.device,
    distances: Optional[int] = None, bases: int = 4, partners_per_distance: int = 4, seed: int = 0, progress: bool = True,
) -> dict:
    """Sample pairs and measure them; returns the report (pairs, per-distance summary, correlations)."""
    choice, D = check_request(space, layer, candidate, distances, bases, partners_per_distance)
    rng = random.Random(f"interference:{seed}:{layer}:{candidate}")
    model.eval()
    pairs = []
    with tqdm(total=bases * (1 + D * partners_per_distance), desc="interference", unit="child",
              disable=not progress, dynamic_ncols=True) as bar:
        for b in range(bases):
            base = list(space.random_arch(rng))
            base[layer] = choice
            base = tuple(base)
            base_pass = child_pass(model, base, layer, batches, device)
            bar.update(1)
            for d in range(1, D + 1):
                for _ in range(partners_per_distance):
                    partner, changed = sample_partner(space, base, layer, d, rng)
                    other = child_pass(model, partner, layer, batches, device)
                    bar.update(1)
                    pairs.append({
                        "base_index": b, "base": space.arch_id(base), "partner": space.arch_id(partner), "distance": d,
                        "changed_layers": changed, "changed_before": sum(l < layer for l in changed),
                        "changed_after": sum(l > layer for l in changed),
                        "base_loss": base_pass.loss, "partner_loss": other.loss, **compare(base_pass, other),
                    })
    return {
        "operator": {"layer": layer, "candidate": candidate},
        "settings": {"distances": D, "bases": bases, "partners_per_distance": partners_per_distance,
                     "dev_batches": len(batches), "seed": seed},
        "by_distance": summarize(pairs, D),
        "correlations": correlations(pairs),
        "pairs": pairs,
    }


def _mean_std(values: Sequence[float]) -> tuple[Optional[float], Optional[float]]:
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(pairs: list[dict], D: int) -> list[dict]:
    rows = []
    for d in range(1, D + 1):
        at = [p for p in pairs if p["distance"] == d]
        row = {"distance": d, "count": sum(p["grad_cos"] is not None for p in at)}
        for key in ("grad_cos", "input_sim", "output_sim"):
            mean, std = _mean_std([p[key] for p in at if p[key] is not None])
            row[f"{key}_mean"], row[f"{key}_std"] = mean, std
        rows.append(row)
    return rows


def partial_spearman_given_groups(x: Sequence[float], y: Sequence[float], groups: Sequence[int]) -> dict:
    """Spearman correlation of x and y controlling for a categorical variable (here the distance d).

    Ranks of x and y are centred within each group and the residuals correlated (Pearson), so a
    correlation that exists only *between* distances (both similarity and gradient cosine fall with
    d) does not count. p-value from the t distribution with n - 1 - groups degrees of freedom.
    """
    import numpy as np
    from scipy import stats

    x, y, g = np.asarray(x, float), np.asarray(y, float), np.asarray(groups)
    levels = np.unique(g)
    n, dof = len(x), len(x) - 1 - len(levels)
    if dof < 1:
        return {"rho": None, "p": None, "n": n}
    rx, ry = stats.rankdata(x), stats.rankdata(y)
    for level in levels:
        at = g == level
        rx[at] -= rx[at].mean()
        ry[at] -= ry[at].mean()
    if not rx.any() or not ry.any():
        return {"rho": None, "p": None, "n": n}
    rho = float(np.dot(rx, ry) / np.sqrt(np.dot(rx, rx) * np.dot(ry, ry)))
    t = rho * np.sqrt(dof / max(1e-300, 1.0 - rho * rho))
    return {"rho": rho, "p": float(2 * stats.t.sf(abs(t), dof)), "n": n}


def correlations(pairs: list[dict]) -> dict:
    """Spearman(d, grad cos) (paper: negative) and Spearman(input/output sim, grad cos) (paper: positive).

    Observation 2 is confounded by distance: pairs that differ in more layers have both less similar
    inputs/outputs and less similar gradients. So besides the pooled correlation, each similarity is
    also reported per distance (``*_by_distance``) and as a partial Spearman given d (``*_given_d``);
    only the latter two speak for observation 2 itself.
    """
    out = {}
    for key, name in (("distance", "distance_vs_grad_cos"), ("input_sim", "input_sim_vs_grad_cos"), ("output_sim", "output_sim_vs_grad_cos")):
        ok = [p for p in pairs if p[key] is not None and p["grad_cos"] is not None]
        out[name] = spearman([p[key] for p in ok], [p["grad_cos"] for p in ok]) if len(ok) >= 2 else {"rho": None, "p": None, "n": len(ok)}
        if key == "distance":
            continue
        out[f"{name}_given_d"] = partial_spearman_given_groups(
            [p[key] for p in ok], [p["grad_cos"] for p in ok], [p["distance"] for p in ok])
        per_d = {}
        for d in sorted({p["distance"] for p in ok}):
            at = [p for p in ok if p["distance"] == d]
            per_d[str(d)] = spearman([p[key] for p in at], [p["grad_cos"] for p in at]) if len(at) >= 3 else {"rho": None, "p": None, "n": len(at)}
        out[f"{name}_by_distance"] = per_d
    return out


def write_report(report: dict, out: Path) -> dict[str, Path]:
    """interference.json + two PNGs in ``out``; returns the paths written."""
    from nasfast.analysis import plots

    out.mkdir(parents=True, exist_ok=True)
    op = report["operator"]
    title = f"layer {op['layer']}, {op['candidate']}"
    paths = {"json": out / "interference.json", "distance_png": out / "grad_cos_vs_distance.png",
             "similarity_png": out / "grad_cos_vs_similarity.png"}
    atomic_write_text(paths["json"], json.dumps(report, indent=2))
    plots.save_figure(distance_figure(report, title), paths["distance_png"])
    plots.save_figure(similarity_figure(report, title), paths["similarity_png"])
    return paths


def distance_figure(report: dict, title: str):
    """Gradient cosine per distance d: mean ± std over the pairs at d (the legend says so)."""
    from nasfast.analysis import plots

    rows = [r for r in report["by_distance"] if r["grad_cos_mean"] is not None]
    return plots.errorbar_figure([r["distance"] for r in rows], [r["grad_cos_mean"] for r in rows],
                                 [r["grad_cos_std"] for r in rows], "mean ± std over pairs at d",
                                 "distance d (other layers that differ)", "gradient cosine", title)


def similarity_figure(report: dict, title: str):
    """Gradient cosine vs input / output similarity, coloured by d, with observation 2's number: the
    partial Spearman ρ given d (``correlations``' ``*_given_d``, the one in interference.json)."""
    from nasfast.analysis import plots

    panels = []
    for key, label in (("input_sim", "input similarity"), ("output_sim", "output similarity")):
        ok = [p for p in report["pairs"] if p[key] is not None and p["grad_cos"] is not None]
        given = report["correlations"][f"{key}_vs_grad_cos_given_d"]
        note = f"partial Spearman ρ given d = {fmt(given['rho'], '+.3f')} (p = {fmt(given['p'], '.3g')}, n = {given['n']})"
        panels.append({"x": [p[key] for p in ok], "y": [p["grad_cos"] for p in ok], "d": [p["distance"] for p in ok],
                       "xlabel": label, "ylabel": "gradient cosine", "note": note})
    return plots.similarity_figure(panels, title)


def format_report(report: dict) -> str:
    op, c = report["operator"], report["correlations"]
    lines = [f"operator: layer {op['layer']}, {op['candidate']}  ({len(report['pairs'])} pairs)",
             "   d  count  grad_cos mean ± std   input_sim  output_sim"]
    for r in report["by_distance"]:
        lines.append(f"{r['distance']:>4}  {r['count']:>5}  {fmt(r['grad_cos_mean'], '8.4f')} ± {fmt(r['grad_cos_std'], '.4f')}"
                     f"   {fmt(r['input_sim_mean'], '9.4f')}  {fmt(r['output_sim_mean'], '10.4f')}")
    for name, label, expect in (("distance_vs_grad_cos", "Spearman(d, grad cos)", "paper: < 0"),
                                ("input_sim_vs_grad_cos", "Spearman(input sim, grad cos)", "paper: > 0"),
                                ("output_sim_vs_grad_cos", "Spearman(output sim, grad cos)", "paper: > 0")):
        r = c[name]
        lines.append(f"{label:<31} rho = {fmt(r['rho'], '+.3f')}  p = {fmt(r['p'], '.3g')}  n = {r['n']}  ({expect})")
        if f"{name}_given_d" in c:
            g = c[f"{name}_given_d"]
            lines.append(f"{'  ... controlling for d':<31} rho = {fmt(g['rho'], '+.3f')}  p = {fmt(g['p'], '.3g')}  (partial Spearman)")
            per_d = "  ".join(f"d={d}: {fmt(v['rho'], '+.2f')}" for d, v in c[f"{name}_by_distance"].items())
            lines.append(f"{'  ... within each d':<31} {per_d}")
    return "\n".join(lines)
