"""What the bench scripts' plots share: matplotlib on the Agg backend (or an install hint
when it is missing) and writing a finished figure."""

from __future__ import annotations

import sys
from pathlib import Path

PLOT_HINT = "matplotlib is not installed: pip install -e '.[bench]' for the plot"


def pyplot():
    """``matplotlib.pyplot`` (Agg backend), or ``None`` with :data:`PLOT_HINT` on stderr."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(PLOT_HINT, file=sys.stderr)
        return None
    return plt


def save(plt, fig, ax, path: Path, title: str = "") -> None:
    """Title (if any), tight layout, write ``path`` (making its folder), close the figure."""
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
