"""The dataset card's figures: attribute class charts (the paper's Figure 6) and example grids.

Drawn with matplotlib's Agg renderer through ``matplotlib.figure.Figure`` (no pyplot, no global
backend switch) and saved without the version stamp, so the same build gives the same PNG bytes.
"""

from __future__ import annotations

import io

from PIL import Image

from ..figure_text import FONT, wrap_to_width


# -- figures -----------------------------------------------------------------------------------
def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return buf.getvalue()


def class_chart_png(title: str, classes: list[tuple[str, int]], total: int) -> bytes:
    """A horizontal bar chart of (class, count), most frequent on top, like the paper's Figure 6."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 0.35 * max(len(classes), 3) + 1.2))
    ax = fig.subplots()
    names = [c for c, _ in classes][::-1]
    counts = [n for _, n in classes][::-1]
    bars = ax.barh(range(len(names)), counts, color="#4c72b0")
    ax.set_yticks(range(len(names)), names)
    for bar, n in zip(bars, counts):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {n} ({100 * n / total:.1f}%)" if total else "",
                va="center", fontsize=8)
    ax.set_xlabel("images")
    ax.set_title(title)
    ax.set_xlim(0, max(counts, default=1) * 1.3)
    if not classes:
        ax.text(0.5, 0.5, "no classes", transform=ax.transAxes, ha="center")
    fig.tight_layout()
    return _png(fig)


GRID_LABEL_WIDTH_IN, GRID_FONT_SIZE, GRID_MAX_LINES = 2.8, 8, 6


def example_grid_png(title: str, pairs: list[tuple[bytes, str, bytes, str]]) -> bytes:
    """Rows of (normal image, its label, anomaly image, its label): normal left, anomaly right."""
    return _png(example_grid_figure(title, pairs))


def example_grid_figure(title: str, pairs: list[tuple[bytes, str, bytes, str]]):
    """The grid's ``Figure``. Labels are wrapped under their image as axis labels, so the
    constrained layout makes room for them whatever their length: nothing overlaps a title or the
    next row."""
    from matplotlib.figure import Figure

    labels = [[wrap_to_width(t, GRID_LABEL_WIDTH_IN, GRID_FONT_SIZE, GRID_MAX_LINES) for t in (a, b)]
              for _, a, _, b in pairs]
    lines = max((lab.count("\n") + 1 for row in labels for lab in row), default=1)
    fig = Figure(figsize=(6.4, (2.9 + 0.16 * lines) * len(pairs) + 0.5), layout="constrained")
    axes = fig.subplots(len(pairs), 2, squeeze=False)
    for row, (left, _, right, _), texts in zip(axes, pairs, labels):
        for ax, data, label in ((row[0], left, texts[0]), (row[1], right, texts[1])):
            with Image.open(io.BytesIO(data)) as im:
                ax.imshow(im.convert("RGB"))
            ax.set_anchor("NW")  # image and label start at the column's left: the label fits the column
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            ax.set_xlabel(label, fontsize=GRID_FONT_SIZE, family=FONT, loc="left", multialignment="left")
    fig.suptitle(title, fontsize=11)
    return fig


