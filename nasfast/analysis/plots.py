"""PNG plots of the analysis commands (matplotlib, headless).

Each ``*_figure`` function returns the matplotlib Figure (tests check its artists); the commands
save it with ``save_figure``. Rules every plot keeps: an error bar says what it is (legend), discrete
values (distance d, generation) get discrete colours and a legend, tick labels never overlap.
"""
from __future__ import annotations

from typing import Optional, Sequence

from nasfast.training.metrics import pyplot as _pyplot
from nasfast.training.metrics import save_figure

__all__ = ["errorbar_figure", "rank_figure", "similarity_figure", "save_figure", "discrete_colours", "tidy_ticks"]

MAX_LEGEND_LEVELS = 12  # more discrete levels than this get a stepped colour bar instead of a legend


def tidy_ticks(ax, bins: int = 5) -> None:
    """At most ``bins`` ticks per axis, plain numbers (no offset): long labels such as 6.7125 on a
    narrow axis otherwise run into each other."""
    from matplotlib.ticker import MaxNLocator, ScalarFormatter

    for axis in (ax.xaxis, ax.yaxis):
        if axis.get_scale() != "linear":
            continue
        axis.set_major_locator(MaxNLocator(nbins=bins))
        formatter = ScalarFormatter(useOffset=False)
        axis.set_major_formatter(formatter)


def discrete_colours(levels: Sequence, ordered: bool = False) -> dict:
    """One distinct colour per level: tab10 / tab20, or with ``ordered`` (and for many levels) evenly
    spaced viridis samples, dark to light, which keep the order visible and never look like the red
    highlights drawn over them."""
    plt = _pyplot()
    levels = list(levels)
    if ordered or len(levels) > 20:
        cmap = plt.get_cmap("viridis")
        return {v: cmap(0.9 * i / max(len(levels) - 1, 1)) for i, v in enumerate(levels)}
    if len(levels) <= 10:
        cmap = plt.get_cmap("tab10")
        return {v: cmap(i) for i, v in enumerate(levels)}
    cmap = plt.get_cmap("tab20")
    return {v: cmap(i) for i, v in enumerate(levels)}


def errorbar_figure(x: Sequence, mean: Sequence, err: Sequence, err_label: str, xlabel: str, ylabel: str, title: str):
    """Means with error bars; ``err_label`` says what the bars are (e.g. "mean ± std over pairs")."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.errorbar(x, mean, yerr=err, marker="o", capsize=4, label=err_label)
    ax.set_xticks(list(x))
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def similarity_figure(panels: list[dict], title: str):
    """Gradient cosine vs a similarity, one panel each, points coloured by the integer distance d.

    A panel: ``{"x", "y", "d" (integers), "xlabel", "ylabel", "note" (the panel's title line: the
    statistic it shows)}``. One legend of the distances for the figure, outside the panels.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels) + 0.9, 4.0), squeeze=False)
    levels = sorted({d for p in panels for d in p["d"]})
    colours = discrete_colours(levels)
    for ax, p in zip(axes[0], panels):
        for d in levels:
            at = [i for i, v in enumerate(p["d"]) if v == d]
            ax.scatter([p["x"][i] for i in at], [p["y"][i] for i in at], s=18, color=colours[d], label=f"d = {d}")
        ax.set(xlabel=p["xlabel"], ylabel=p["ylabel"])
        ax.set_title(p.get("note", ""), fontsize=9)
        tidy_ticks(ax)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, title="distance", fontsize=8, title_fontsize=8, loc="center right")
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1 - 0.9 / fig.get_figwidth(), 1))
    return fig


def rank_figure(truth: Sequence[float], estimate: Sequence[float], metric: str, title: str,
                ceiling: Optional[float] = None):
    """Inherited-weight estimate vs ground truth per child; the replicate ceiling of τ when known."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 4.2))
    ax.scatter(truth, estimate, s=18, label="child")
    if ceiling is not None:  # no data coordinate: shown as a legend entry beside the points
        ax.plot([], [], " ", label=f"replicate ceiling τ = {ceiling:.3f} (between ground-truth seeds)")
    ax.set(xlabel=f"ground-truth dev {metric} (standalone)", ylabel=f"inherited-weight dev {metric}", title=title)
    tidy_ticks(ax)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig
