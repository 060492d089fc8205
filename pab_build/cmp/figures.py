"""Figures of the CMP evaluation: ``cmp/top5.png``, the paper's Figure 5.

One row per query: the query caption (wrapped, in DejaVu Sans, which ships with matplotlib and
renders the non-ASCII text VLM captions contain), then its top-5 gallery images with their rank,
framed green (the exact image), blue (same person, other behavior) or red (another person), and a
legend saying so. Drawn with ``matplotlib.figure.Figure`` (Agg, no pyplot) and saved without the
version stamp, so the same scores give the same bytes.
"""

from __future__ import annotations

import io

from ..figure_text import FONT, wrap_to_width

TOP = 5
MATCH_COLOURS = {"match": "#28aa3c", "identity": "#285adc", "other": "#d22828"}
MATCH_LABELS = {"match": "match (the query's image)", "identity": "same person, other behavior",
                "other": "mismatch (another person)"}
QUERY_WIDTH_IN, QUERY_FONT_SIZE, MAX_LINES = 2.9, 8, 9


def match_kind(query, gallery) -> str:
    return "match" if gallery.key == query.key else "identity" if gallery.identity == query.identity else "other"


def wrapped_query(behavior: str, caption: str) -> str:
    return f"query ({behavior}):\n" + (wrap_to_width(caption, QUERY_WIDTH_IN, QUERY_FONT_SIZE, MAX_LINES)
                                       or "(empty caption)")


def top5_png(samples, scores, queries: list[int]) -> bytes:
    """``samples``: the gallery (each with key, identity, behavior, caption, thumbnail); query i
    is the caption of sample i; ``scores[i][j]``: query i against image j."""
    buf = io.BytesIO()
    top5_figure(samples, scores, queries).savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return buf.getvalue()


def top5_figure(samples, scores, queries: list[int]):
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    rows = max(1, len(queries))
    fig = Figure(figsize=(3.4 + 1.7 * TOP, 2.0 * rows + 0.7))
    grid = fig.add_gridspec(rows, TOP + 1, width_ratios=[2.0] + [1.0] * TOP, left=0.01, right=0.99,
                            top=1 - 0.6 / fig.get_figheight(), bottom=0.02, wspace=0.08, hspace=0.25)
    for row, qi in enumerate(queries):
        q = samples[qi]
        text_ax = fig.add_subplot(grid[row, 0])
        text_ax.axis("off")
        text_ax.text(0.0, 1.0, wrapped_query(q.behavior, q.caption), va="top", ha="left", fontsize=QUERY_FONT_SIZE,
                     family=FONT, transform=text_ax.transAxes, wrap=False)
        order = sorted(range(len(samples)), key=lambda j: (-float(scores[qi][j]), j))[:TOP]
        for col, gj in enumerate(order):
            g = samples[gj]
            colour = MATCH_COLOURS[match_kind(q, g)]
            ax = fig.add_subplot(grid[row, col + 1])
            ax.imshow(g.thumbnail.convert("RGB"))
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(4)
            ax.set_title(f"{col + 1}", fontsize=9, family=FONT, color=colour, fontweight="bold", pad=3)
    fig.legend(handles=[Patch(facecolor="white", edgecolor=MATCH_COLOURS[k], linewidth=3, label=MATCH_LABELS[k])
                        for k in MATCH_COLOURS],
               loc="upper center", ncol=3, frameon=False, prop={"family": FONT, "size": 9},
               title="top-5 images per query, rank above each; frame colour:", title_fontsize=9)
    return fig
