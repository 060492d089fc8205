"""The figures people read: CMP's top-5 figure (legend, ranks, frame colours, wrapped query) and the
card's example grids; no text overlaps anything at any caption length."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
import pytest
from PIL import Image

from pab_build.cmp.figures import MATCH_COLOURS, match_kind, top5_figure, top5_png
from pab_build.figure_text import _width_pt, renderable, wrap_to_width
from pab_build.release.card_figures import example_grid_figure, example_grid_png

CAPTIONS = ["short", "A woman in a red coat — café, naïve “quotes”, 日本 " * 3, "W" * 300,
            "a child rides a bicycle along the river " * 20]


@dataclass
class Sample:
    key: str
    identity: str
    behavior: str
    caption: str
    thumbnail: Image.Image


def _samples(n: int = 8) -> list[Sample]:
    rng = np.random.default_rng(0)
    return [Sample(f"c{i // 2}-{('normal', 'anomaly')[i % 2]}", f"c{i // 2}", ("normal", "anomaly")[i % 2],
                   CAPTIONS[i % len(CAPTIONS)], Image.fromarray((rng.random((96, 48 + 16 * (i % 3), 3)) * 255).astype("uint8")))
            for i in range(n)]


def _boxes_apart(fig, texts, others) -> None:
    """Every text lies inside the figure and overlaps none of ``others`` (axes or texts)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    page = fig.bbox
    for t in texts:
        box = t.get_window_extent(renderer)
        assert page.x0 - 1 <= box.x0 and box.x1 <= page.x1 + 1 and page.y0 - 1 <= box.y0 and box.y1 <= page.y1 + 1, \
            (t.get_text()[:40], box, page)
        for other in others:
            if other is t:
                continue
            ob = other.get_window_extent(renderer)
            assert not box.overlaps(ob), (t.get_text()[:40], box, ob)


def test_wrapping_by_measured_width_and_glyphs_the_font_lacks():
    assert renderable("café 日本\n") == "café ??\n"
    for text in CAPTIONS:
        wrapped = wrap_to_width(text, 2.0, 8, max_lines=5)
        lines = wrapped.split("\n")
        assert len(lines) <= 5 and all(_width_pt(ln, 8) <= 2.0 * 72 for ln in lines)
    assert wrap_to_width("W" * 300, 2.0, 8, 5).endswith("…")
    assert wrap_to_width("short", 2.0, 8, 5) == "short"


def test_top5_has_a_legend_ranks_and_frames_coloured_by_match():
    samples = _samples()
    scores = np.eye(len(samples))[:, ::-1] + np.arange(len(samples))[None, :] * 1e-3  # query i: best image is 7-i
    queries = [0, 1, 2, 3]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a missing glyph warns: the figure must not have any
        fig = top5_figure(samples, scores, queries)
    legend = fig.legends[0]
    labels = [t.get_text() for t in legend.get_texts()]
    assert labels == ["match (the query's image)", "same person, other behavior", "mismatch (another person)"]
    assert [h.get_edgecolor() for h in legend.legend_handles] == [
        pytest.approx((*(int(c[i:i + 2], 16) / 255 for i in (1, 3, 5)), 1.0)) for c in MATCH_COLOURS.values()]
    image_axes = [ax for ax in fig.axes if ax.images]
    assert len(image_axes) == 5 * len(queries)
    for row, qi in enumerate(queries):
        order = sorted(range(len(samples)), key=lambda j: (-scores[qi][j], j))[:5]
        for col, gj in enumerate(order):
            ax = image_axes[row * 5 + col]
            assert ax.get_title() == str(col + 1)
            want = MATCH_COLOURS[match_kind(samples[qi], samples[gj])]
            assert ax.spines["left"].get_edgecolor()[:3] == pytest.approx(
                tuple(int(want[i:i + 2], 16) / 255 for i in (1, 3, 5)))
    texts = [t for ax in fig.axes if not ax.images for t in ax.texts]
    assert [t.get_text().split("\n")[0] for t in texts] == [f"query ({samples[q].behavior}):" for q in queries]
    _boxes_apart(fig, texts + [legend], image_axes + texts + [legend])
    assert top5_png(samples, scores, queries) == top5_png(samples, scores, queries)


@pytest.mark.parametrize("caption", CAPTIONS)
def test_card_grid_labels_overlap_nothing_at_any_length(caption):
    def jpeg(size) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", size, "gray").save(buf, format="JPEG")
        return buf.getvalue()

    pairs = [(jpeg((30, 200)), f"normal: {caption}", jpeg((200, 90)), f"anomaly: {caption}"),
             (jpeg((64, 64)), "normal: short", jpeg((20, 200)), f"anomaly: {caption} {caption}")]
    fig = example_grid_figure("Training set: normal | anomaly", pairs)
    labels = [ax.xaxis.label for ax in fig.axes]
    _boxes_apart(fig, labels + [fig._suptitle], fig.axes + labels + [fig._suptitle])
    with Image.open(io.BytesIO(example_grid_png("t", pairs))) as im:
        assert im.format == "PNG"
