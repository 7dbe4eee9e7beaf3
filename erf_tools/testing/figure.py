"""Side-by-side figure of the snapshot's and the current ERF map (and their difference), for failure messages.

matplotlib is imported only when a figure is drawn (the Agg backend: works without a display).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .snapshot import SnapshotMap

__all__ = ["side_by_side_figure"]


def side_by_side_figure(snapshot: SnapshotMap, now: SnapshotMap, path: str | Path, *, title: str = "") -> Path:
    """Draw snapshot | now | now − snapshot (max-normalised block means) into ``path`` (PNG); return the path."""
    from matplotlib.figure import Figure

    left, right = np.asarray(snapshot.values, dtype=float), np.asarray(now.values, dtype=float)
    same = left.shape == right.shape
    figure = Figure(figsize=(9.6 if same else 6.6, 3.4), dpi=100, layout="constrained")
    axes = figure.subplots(1, 3 if same else 2)
    for ax, data, name in zip(axes, (left, right), ("snapshot", "now")):
        image = ax.imshow(data, cmap="magma", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(f"{name} ({data.shape[0]}×{data.shape[1]} blocks)", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    figure.colorbar(image, ax=list(axes[:2]), shrink=0.8, label="map / max")
    if same:
        diff = right - left
        limit = float(np.max(np.abs(diff))) or 1.0
        image = axes[2].imshow(diff, cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
        axes[2].set_title("now − snapshot", fontsize=9)
        axes[2].set_xticks([])
        axes[2].set_yticks([])
        figure.colorbar(image, ax=axes[2], shrink=0.8)
    if title:
        figure.suptitle(title, fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path
