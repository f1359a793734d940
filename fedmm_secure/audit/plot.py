"""Log-log ROC plot (Carlini et al. style), rendered with the Agg canvas directly so that no
global matplotlib backend state is touched."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .metrics import RocCurve

__all__ = ["save_roc_plot"]


def save_roc_plot(curves: list[tuple[str, RocCurve]], path: Path | str, *, title: str) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    fig = Figure(figsize=(5.5, 5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    floor = 1e-4
    for label, curve in curves:
        # Zero rates cannot sit on log axes; they are drawn at the floor.
        ax.plot(np.maximum(curve.fpr, floor), np.maximum(curve.tpr, floor), label=label, lw=1.3)
    ax.plot([floor, 1], [floor, 1], ls="--", color="grey", lw=0.8, label="chance")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(floor, 1)
    ax.set_ylim(floor, 1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=7)
    ax.grid(True, which="major", alpha=0.3)
    ax.minorticks_off()
    fig.subplots_adjust(left=0.14, right=0.97, bottom=0.11, top=0.93)  # tight_layout costs ~1 s on log axes
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
