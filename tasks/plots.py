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
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    return path
