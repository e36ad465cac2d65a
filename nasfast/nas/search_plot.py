"""search.png: score against parameters of every child a search evaluated, by generation, with the
Pareto front (written by ``nasfast search`` through ``plot_search``)."""
from __future__ import annotations

from pathlib import Path


def plot_search(path: Path, result: dict) -> None:
    """search.png (``search_figure``)."""
    from nasfast.analysis.plots import save_figure

    save_figure(search_figure(result), path)


def _generation_colours(ax, fig, children: list[dict]) -> None:
    """Every child's point, one discrete colour per generation: a legend for a few generations, a
    stepped colour bar with integer ticks for many (a continuous bar would suggest fractional ones)."""
    from nasfast.analysis.plots import MAX_LEGEND_LEVELS, discrete_colours

    generations = sorted({c["generation"] for c in children})
    if len(generations) <= MAX_LEGEND_LEVELS:
        colours = discrete_colours(generations, ordered=True)
        for g in generations:
            at = [c for c in children if c["generation"] == g]
            ax.scatter([c["params"] / 1e6 for c in at], [c["score"] for c in at], s=16, color=colours[g], alpha=0.85,
                       label=f"generation {g}")
        return
    import matplotlib as mpl

    norm = mpl.colors.BoundaryNorm([g - 0.5 for g in generations] + [generations[-1] + 0.5], 256)
    points = ax.scatter([c["params"] / 1e6 for c in children], [c["score"] for c in children],
                        c=[c["generation"] for c in children], cmap="viridis", norm=norm, s=16, alpha=0.85)
    bar = fig.colorbar(points, ax=ax, label="generation")
    bar.locator = mpl.ticker.MaxNLocator(integer=True)
    bar.update_ticks()


def search_figure(result: dict):
    """Score vs parameters (millions) of every evaluated child, one colour per generation; the Pareto
    front highlighted."""
    from nasfast.analysis.plots import tidy_ticks
    from nasfast.training.metrics import pyplot as _pyplot

    plt = _pyplot()
    children = result["children"]
    front = set(result["pareto"])
    fig, ax = plt.subplots(figsize=(7.6, 4.2))
    _generation_colours(ax, fig, children)
    pf = sorted((c for c in children if c["arch"] in front), key=lambda c: c["params"])
    ax.step([c["params"] / 1e6 for c in pf], [c["score"] for c in pf], where="post", color="crimson", lw=1.2)
    ax.scatter([c["params"] / 1e6 for c in pf], [c["score"] for c in pf], s=40, facecolors="none", edgecolors="crimson",
               label="Pareto front (params, score)")
    if result.get("best"):
        ax.scatter([result["best"]["params"] / 1e6], [result["best"]["score"]], marker="*", s=160, color="crimson",
                   label="best")
    if result["budget"].get("max_params"):
        ax.axvline(result["budget"]["max_params"] / 1e6, color="k", ls="--", lw=1, label="params budget")
    ax.set(xlabel="parameters (M)", ylabel="dev MLM loss (inherited weights)",
           title=f"{result['strategy']} search: {len(children)} children")
    tidy_ticks(ax)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))  # outside: never over a point
    fig.tight_layout()
    return fig
