"""Plots fit for a paper (issue 29, class 8): checked on the matplotlib Figure, and the PNG decodes.

Every figure: tick labels are separate Text objects whose window extents do not overlap; discrete
values (distance d, generation) have legend entries, no colour bar; error bars say what they are.
"""
from __future__ import annotations

import itertools
import json
import random

import numpy as np
import pytest
from matplotlib.transforms import Bbox
from scipy import stats

from nasfast.analysis import interference, plots
from nasfast.analysis.ranking import replicate_ceiling
from nasfast.nas.search_plot import search_figure
from nasfast.training.metrics import curves_figure, pyplot, training_curves
from tests.runhelpers import cli


def assert_ticks_separate(fig) -> None:
    """On every axes: visible tick labels are distinct, non-empty Text objects whose window extents
    do not overlap, with at least one em between neighbours along x (half an em along y): labels
    closer than that read as one string."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        for labels, pad in ((ax.get_xticklabels(), (1.0, 0.0)), (ax.get_yticklabels(), (0.0, 0.5))):
            shown = [t for t in labels if t.get_visible() and t.get_text()
                     and ax.get_window_extent(renderer).expanded(1.2, 1.2).overlaps(t.get_window_extent(renderer))]
            texts = [t.get_text() for t in shown]
            assert len(texts) == len(set(texts)), texts
            boxes = [t.get_window_extent(renderer) for t in shown]
            em = shown[0].get_fontsize() * fig.dpi / 72 if shown else 0.0
            for a, b in itertools.combinations(boxes, 2):
                wide = Bbox([[a.x0 - pad[0] * em, a.y0 - pad[1] * em], [a.x1 + pad[0] * em, a.y1 + pad[1] * em]])
                assert not wide.overlaps(b), (texts, a, b)


def legend_texts(fig) -> list[str]:
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend()] + list(fig.legends)
    return [t.get_text() for legend in legends for t in legend.get_texts()]


def figure_texts(fig) -> str:
    texts = [t.get_text() for t in fig.findobj(match=lambda a: hasattr(a, "get_text"))]
    return "\n".join(t for t in texts if isinstance(t, str))


def assert_png(path, fig_size, dpi=120) -> None:
    image = pyplot().imread(path)
    assert image.shape[:2] == (round(fig_size[1] * dpi), round(fig_size[0] * dpi))


# --- rank_scatter.png --------------------------------------------------------------------------------
def close_losses(n: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [5.9500 + 0.0004 * i + rng.uniform(0, 1e-4) for i in range(n)]  # a narrow range: long tick labels


def test_rank_ticks_are_separate_and_the_ceiling_is_in_the_legend():
    truth, est = close_losses(8, 0), close_losses(8, 1)
    fig = plots.rank_figure(truth, est, "loss", "loss: Kendall τ", ceiling=0.5)
    assert_ticks_separate(fig)
    assert any("replicate ceiling τ = 0.500" in t for t in legend_texts(fig))
    fig = plots.rank_figure(truth, est, "loss", "t")  # no replicate: no ceiling claimed
    assert not any("ceiling" in t for t in legend_texts(fig))


def write_results(path, values: dict) -> None:
    path.write_text(json.dumps({"results": [{"arch": a, "loss": v, "accuracy": 0.1} for a, v in values.items()]}))


@pytest.mark.slow
def test_rank_cli_stores_the_replicate_ceiling_and_writes_the_png(tmp_path):
    archs = [f"mha:2|ffn:{i}" for i in range(8)]
    est, truth, rep = (dict(zip(archs, close_losses(8, s))) for s in (1, 2, 3))
    rep[archs[0]], rep[archs[1]] = rep[archs[1]], rep[archs[0]]  # the replicate disagrees a little
    for name, values in (("est", est), ("truth", truth), ("rep", rep)):
        write_results(tmp_path / f"{name}.json", values)
    res = cli("rank", "--estimates", tmp_path / "est.json", "--truth", tmp_path / "truth.json",
              "--replicate", tmp_path / "rep.json", "--out", tmp_path / "out")
    assert res.returncode == 0, res.stderr
    saved = json.loads((tmp_path / "out" / "rank.json").read_text())
    expected = stats.kendalltau([truth[a] for a in archs], [rep[a] for a in archs]).statistic
    assert saved["replicate_ceiling"]["tau"] == pytest.approx(expected)
    assert "replicate ceiling" in res.stdout
    assert_png(tmp_path / "out" / "rank_scatter.png", (5.2, 4.2))


def test_replicate_ceiling_averages_every_pair():
    a, b, c = ({"results": [{"arch": str(i), "loss": v} for i, v in enumerate(vals)]}
               for vals in ([1, 2, 3, 4], [1, 2, 4, 3], [4, 3, 2, 1]))
    taus = [stats.kendalltau(x, y).statistic for x, y in itertools.combinations(([1, 2, 3, 4], [1, 2, 4, 3], [4, 3, 2, 1]), 2)]
    assert replicate_ceiling([a, b, c])["tau"] == pytest.approx(np.mean(taus))
    assert replicate_ceiling([a])["tau"] is None


# --- curves.png -----------------------------------------------------------------------------------
def magic_records(steps: int = 12) -> list[dict]:
    records = []
    for s in range(1, steps + 1):
        mlm, align = 6.0 - 0.05 * s, (0.0 if s <= 4 else 0.02 + 0.001 * s)
        r = {"step": s, "mlm_loss": mlm, "align_loss": align, "loss": mlm + 10.0 * align,
             "anchor": None if s <= 4 else ("mha:2|ffn:8" if s < 9 else "conv:3|ffn:8"), "anchor_changed": s == 9}
        if s % 4 == 0:
            r["dev"] = {"largest_with_context": {"loss": mlm + 0.1}, "smallest": {"loss": mlm + 0.2}}
        records.append(r)
    return records


def test_curves_plot_mlm_loss_not_the_aligned_total(tmp_path):
    records = magic_records()
    fig = curves_figure(records, unigram=5.5)
    top = fig.axes[0]
    [mlm] = [line for line in top.get_lines() if "MLM" in (line.get_label() or "")]
    assert list(mlm.get_ydata()) == [r["mlm_loss"] for r in records]
    [align] = [line for ax in fig.axes for line in ax.get_lines() if "alignment loss" in line.get_label()]
    assert list(align.get_ydata()) == [r["align_loss"] for r in records]
    anchors = sorted({line.get_xdata()[0] for ax in fig.axes for line in ax.get_lines() if line.get_linestyle() == ":"})
    assert anchors == [5, 9]  # chosen after the warm-up, replaced at step 9
    assert "anchor chosen or changed" in legend_texts(fig)
    assert "dev largest with context" in legend_texts(fig)
    assert_ticks_separate(fig)
    training_curves(tmp_path / "curves.png", records, 5.5)
    assert_png(tmp_path / "curves.png", (6.4, 6.2))


def test_curves_of_a_plain_run_have_one_panel():
    records = [{"step": s, "loss": 6.0 - 0.1 * s} for s in range(1, 6)]
    fig = curves_figure(records)
    assert len(fig.axes) == 1
    assert list(fig.axes[0].get_lines()[0].get_ydata()) == [r["loss"] for r in records]


# --- interference --------------------------------------------------------------------------------
def synthetic_pairs(levels=(1, 2, 3), per_level: int = 12, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    pairs = []
    for d in levels:
        for _ in range(per_level):
            sim = 1.0 - 0.1 * d + rng.normal(0, 0.02)
            grad = 0.9 - 0.2 * d + 0.5 * (sim - 1.0 + 0.1 * d) + rng.normal(0, 0.01)
            pairs.append({"distance": d, "grad_cos": grad, "input_sim": sim, "output_sim": sim + rng.normal(0, 0.01)})
    return pairs


def reference_partial_spearman(x, y, d) -> float:
    """Ranks of x and y, residuals of an OLS fit on one indicator per distance, Pearson r of those."""
    rx, ry = stats.rankdata(x), stats.rankdata(y)
    design = np.stack([np.asarray(d) == level for level in sorted(set(d))], axis=1).astype(float)
    res = [r - design @ np.linalg.lstsq(design, r, rcond=None)[0] for r in (rx, ry)]
    return stats.pearsonr(*res).statistic


def test_partial_spearman_matches_a_scipy_reference():
    pairs = synthetic_pairs()
    c = interference.correlations(pairs)
    for key in ("input_sim", "output_sim"):
        expected = reference_partial_spearman([p[key] for p in pairs], [p["grad_cos"] for p in pairs],
                                              [p["distance"] for p in pairs])
        assert c[f"{key}_vs_grad_cos_given_d"]["rho"] == pytest.approx(expected, abs=1e-12)
    two = synthetic_pairs(levels=(1, 2))  # two levels: the textbook formula from Spearman's ρ agrees too
    x, y, d = ([p[k] for p in two] for k in ("input_sim", "grad_cos", "distance"))
    rxy, rxd, ryd = (stats.spearmanr(a, b).statistic for a, b in ((x, y), (x, d), (y, d)))
    textbook = (rxy - rxd * ryd) / np.sqrt((1 - rxd ** 2) * (1 - ryd ** 2))
    assert interference.correlations(two)["input_sim_vs_grad_cos_given_d"]["rho"] == pytest.approx(textbook, abs=1e-12)


def synthetic_report(pairs: list[dict]) -> dict:
    D = max(p["distance"] for p in pairs)
    return {"operator": {"layer": 1, "candidate": "ffn:8"}, "pairs": pairs, "by_distance": interference.summarize(pairs, D),
            "correlations": interference.correlations(pairs)}


def test_similarity_plot_has_discrete_distances_and_the_partial_spearman(tmp_path):
    report = synthetic_report(synthetic_pairs())
    fig = interference.similarity_figure(report, "layer 1, ffn:8")
    assert len(fig.axes) == 2  # two panels, no colour bar
    assert [t for t in legend_texts(fig) if t.startswith("d = ")] == ["d = 1", "d = 2", "d = 3"]
    text = figure_texts(fig)
    for key in ("input_sim", "output_sim"):
        rho = report["correlations"][f"{key}_vs_grad_cos_given_d"]["rho"]
        assert f"partial Spearman ρ given d = {rho:+.3f}" in text
    assert_ticks_separate(fig)
    paths = interference.write_report(report, tmp_path)
    saved = json.loads(paths["json"].read_text())
    assert saved["correlations"]["input_sim_vs_grad_cos_given_d"]["rho"] == report["correlations"]["input_sim_vs_grad_cos_given_d"]["rho"]
    assert_png(paths["similarity_png"], (4.8 * 2 + 0.9, 4.0))


def test_error_bars_say_what_they_are():
    fig = interference.distance_figure(synthetic_report(synthetic_pairs()), "t")
    assert any("std" in t for t in legend_texts(fig))
    assert_ticks_separate(fig)


# --- search.png -----------------------------------------------------------------------------------
def search_result(generations: int) -> dict:
    rng = random.Random(0)
    children = [{"arch": f"a{g}-{i}", "params": rng.randint(11_000_000, 42_000_000), "score": rng.uniform(5, 6),
                 "generation": g} for g in range(generations) for i in range(6)]
    best = min(children, key=lambda c: c["score"])
    return {"children": children, "pareto": [best["arch"]], "best": best, "budget": {"max_params": 40_000_000},
            "strategy": "evolution"}


def test_search_plot_in_millions_with_discrete_generations(tmp_path):
    result = search_result(4)
    fig = search_figure(result)
    ax = fig.axes[0]
    assert len(fig.axes) == 1 and "(M)" in ax.get_xlabel()
    xs = np.concatenate([c.get_offsets()[:, 0] for c in ax.collections])
    assert xs.max() < 100 and xs.min() > 10  # millions, not raw counts
    assert [t for t in legend_texts(fig) if t.startswith("generation")] == [f"generation {g}" for g in range(4)]
    assert_ticks_separate(fig)
    many = search_figure(search_result(30))  # many generations: a stepped bar with integer ticks
    bar = many.axes[1]
    ticks = [float(t) for t in bar.get_yticks() if 0 <= t <= 29]
    assert ticks and all(t == int(t) for t in ticks)
    plots.save_figure(fig, tmp_path / "search.png")
    assert_png(tmp_path / "search.png", (7.6, 4.2))
