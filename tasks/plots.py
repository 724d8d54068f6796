"""Matplotlib figures written atomically as PNG (Agg backend, no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from tasks.common import atomic_path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams["svg.hashsalt"] = "quillan"  # stable output bytes
    return plt


def save_histograms(path: Path, series: dict[str, Sequence[float]], title: str, xlabel: str, bins: int = 30) -> Path:
    """Overlaid histograms, one per named series."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, values in series.items():
        ax.hist(values, bins=bins, alpha=0.5, label=f"{name} (n={len(values)})")
    ax.set(title=title, xlabel=xlabel, ylabel="count")
    ax.legend()
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    """Write the figure as PNG atomically (no software/date metadata: stable bytes) and close it."""
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, metadata={"Software": None})
    _plt().close(fig)
    return path


def save_lines(path: Path, series: dict[str, Sequence[tuple[float, float]]], title: str, xlabel: str,
               ylabel: str) -> Path:
    """One line per named series of (x, y) points."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, pts in series.items():
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, label=name, marker="o" if len(pts) < 20 else None)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    if any(series.values()):
        ax.legend()
    return _save(fig, path)


def save_heatmap(path: Path, matrix, title: str, xlabel: str, ylabel: str) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3 + 0.3 * len(matrix)))
    im = ax.imshow(matrix, aspect="auto", cmap="viridis")
    fig.colorbar(im, ax=ax)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    return _save(fig, path)


def save_bars(path: Path, categories: Sequence[str], series: dict[str, Sequence[float]], title: str,
              ylabel: str) -> Path:
    """Grouped bars: one group per category, one bar per named series, values printed on top."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(1, len(series))
    for k, (name, values) in enumerate(series.items()):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(categories))]
        bars = ax.bar(xs, values, width, label=name)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(range(len(categories)), categories)
    ax.set(title=title, ylabel=ylabel)
    ax.legend()
    return _save(fig, path)


def save_scatter(path: Path, points: dict[str, tuple[float, float]], title: str, xlabel: str, ylabel: str) -> Path:
    """One labelled point per name."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, (x, y) in points.items():
        ax.scatter([x], [y], s=40)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    return _save(fig, path)
