"""One way to draw a figure to a PNG file, headless (the Agg backend)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def png_axes(path: Path, size: tuple[float, float]) -> Iterator:
    """Axes to draw on; the figure is laid out, saved to `path` at 120 dpi and closed on leaving."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size)
    try:
        yield ax
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
