"""PNG plots of the analysis commands (matplotlib, headless)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from nasfast.files import atomic_savefig
from nasfast.training.metrics import pyplot as _pyplot


def errorbar(path: Path, x: Sequence, mean: Sequence, std: Sequence, xlabel: str, ylabel: str, title: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.errorbar(x, mean, yerr=std, marker="o", capsize=4)
    ax.set_xticks(list(x))
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=120)
    plt.close(fig)


def scatter_panels(path: Path, panels: list[dict], title: str) -> None:
    """One scatter per panel: ``{"x", "y", "xlabel", "ylabel", "title", "c" (optional colour values), "clabel"}``."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False)
    for ax, p in zip(axes[0], panels):
        if p.get("c") is not None:
            points = ax.scatter(p["x"], p["y"], c=p["c"], s=18, cmap="viridis")
            fig.colorbar(points, ax=ax, label=p.get("clabel", ""))
        else:
            ax.scatter(p["x"], p["y"], s=18)
        ax.set(xlabel=p["xlabel"], ylabel=p["ylabel"], title=p.get("title", ""))
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=120)
    plt.close(fig)
