"""``calibration/index.html``: the pilot's histograms (threshold drawn on each), near-threshold
contact sheets, kept fractions and labels beside the paper's, and which key sets each threshold.

One self-contained file: plots are inline PNGs (matplotlib's Agg renderer, as the card's figures),
thumbnails inline JPEGs, no script, so it opens from disk on an air-gapped machine.
"""

from __future__ import annotations

import base64
import html
from importlib import resources

from ..config import PABConfig
from ..manifests import manifest_rel, read_manifest_table
from ..review_page import image_data_uri
from ..store import Store
from .calibration import (
    ATTRIBUTE_STAGES,
    CAPTION_END_STAGES,
    MEASURES,
    Measure,
    config_value,
    measured_rows,
    near_threshold,
)
from .card_figures import _png, class_chart_png

THUMB_SIDE = 160
NOT_MEASURED = "not measured by this build"


def _img(png: bytes, alt: str) -> str:
    return (f'<img class="plot" alt="{html.escape(alt)}" '
            f'src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">')


def histogram_png(title: str, xlabel: str, kept: list[float], rejected: list[float],
                  lines: list[tuple[float, str, float]]) -> bytes:
    """Values the stage kept and rejected, stacked, with each threshold as a labelled vertical line;
    a line's shift places it between two count bars (-0.5 for "at least", +0.5 for "at most")."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.0, 3.2))
    ax = fig.subplots()
    values = kept + rejected
    lo, hi = min(values + [v for v, _, _ in lines], default=0.0), max(values + [v for v, _, _ in lines], default=1.0)
    integral = all(float(v).is_integer() for v in values)
    if integral:  # counts: one bar per value
        bins = [b - 0.5 for b in range(int(lo), int(hi) + 2)] if hi - lo < 60 else 30
    else:
        bins = 30
    ax.hist([kept, rejected], bins=bins, range=None if integral else (lo, hi if hi > lo else lo + 1),
            stacked=True, color=["#4c72b0", "#dd8452"], label=[f"kept by the stage ({len(kept)})",
                                                               f"rejected by the stage ({len(rejected)})"])
    for value, label, shift in lines:  # on counts, between the last bar kept and the first rejected
        ax.axvline(value + (shift if integral else 0.0), color="#c62828", linestyle="--", linewidth=1.5)
        ax.text(value, 1.0, f" {label}", color="#c62828", fontsize=8, va="top", rotation=90,
                transform=ax.get_xaxis_transform())
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("items")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the plot: never over a line
    fig.tight_layout()
    return _png(fig)


def share_chart_png(title: str, counts: dict[str, int]) -> bytes:
    return class_chart_png(title, sorted(counts.items(), key=lambda kv: -kv[1]), sum(counts.values()))


def image_index(store: Store) -> dict[str, str]:
    """sample_key -> image path, from the stages that write images (frames, generate)."""
    index: dict[str, str] = {}
    for stage in ("frames", "generate"):
        if store.exists(manifest_rel(stage)):
            t = read_manifest_table(store, stage, ["sample_key", "image_path"])
            index.update((k, p) for k, p in zip(t["sample_key"].to_pylist(), t["image_path"].to_pylist()) if p)
    return index


def _thumb(store: Store, rel: str | None) -> str:
    uri = image_data_uri(store, rel, side=THUMB_SIDE)
    return f'<img alt="{html.escape(rel or "")}" src="{uri}">' if uri else '<span class="unmeasured">no image</span>'


def contact_sheet(store: Store, images: dict[str, str], m: Measure, rows: list[dict], threshold: float) -> str:
    near = near_threshold(rows, m, threshold)
    parts = []
    for side in ("kept", "rejected"):
        figures = []
        for r in near[side]:
            pics = _thumb(store, images.get(r["sample_key"]))
            if r.get("pair_key"):  # a pair: both frames
                pics = f'<div class="pair">{pics}{_thumb(store, images.get(r["pair_key"]))}</div>'
            status = "kept" if r["status"] == "ok" else f"rejected: {r.get('reason') or ''}"
            if r.get("text"):  # a caption: its words are what is judged
                status = f"{status}: \u201c{r['text'][:200]}\u201d"
            figures.append(f'<figure class="{side}">{pics}<figcaption><span class="value">{r["value"]:.4g}</span> '
                           f'{html.escape(r["sample_key"])}<br>{html.escape(status[:260])}</figcaption></figure>')
        label = "passes" if side == "kept" else "fails"
        parts.append(f'<h3><span class="side {side}">{label} the threshold</span>, nearest first '
                     f'({len(near[side])})</h3><div class="sheet">{"".join(figures) or "none in the sample"}</div>')
    return "".join(parts)


def _hint(text: str, keys: list[str], cfg: PABConfig) -> str:
    shown = " / ".join(f"<code>{html.escape(k)}</code>" + ("" if config_value(cfg, k, KeyError) is not KeyError else
                                                            " (not a key of this build's config)") for k in keys)
    where = f" (set in configs/{html.escape(cfg.profile)}.yaml or with <code>--set KEY=VALUE</code>)." if keys else ""
    return f'<div class="hint">What to change: {shown}{where} {html.escape(text)}</div>'


def measure_section(store: Store, cfg: PABConfig, images: dict[str, str], m: Measure, entry: dict) -> str:
    anchor = f"m-{MEASURES.index(m)}"
    head = f'<section id="{anchor}" class="measure"><h2>{html.escape(m.name)}</h2>' \
           f'<p><code>{m.stage}.{m.column}</code></p>'
    keys = [k for k in (m.key, m.upper_key) if k]
    rows = measured_rows(store, m)
    if rows is None:
        return head + f'<p class="unmeasured">{NOT_MEASURED}</p>' + _hint(m.hint, keys, cfg) + "</section>"
    if not rows:
        return head + '<p class="unmeasured">no item has a value here (nobody found?): nothing to plot</p>' + \
            _hint(m.hint, keys, cfg) + "</section>"
    threshold, upper = entry["threshold"], entry.get("upper_threshold")
    at_least = m.passes is None or m.passes(2, 1)
    lines = [(threshold, f"{m.key} = {threshold}", -0.5 if at_least else 0.5)] if threshold is not None else []
    if upper is not None:
        lines.append((upper, f"{m.upper_key} = {upper}", 0.5))
    png = histogram_png(m.name, m.column, [r["value"] for r in rows if r["status"] == "ok"],
                        [r["value"] for r in rows if r["status"] != "ok"], lines)
    body = _img(png, f"histogram: {m.name}")
    stats = (f"<p>{entry['count']} values, min {entry['min']:.4g}, median {entry['median']:.4g}, "
             f"max {entry['max']:.4g}" if entry["count"] else "<p>no values") + \
        (f"; {entry['pass_threshold']} pass the threshold" if "pass_threshold" in entry else "") + "</p>"
    sheet = contact_sheet(store, images, m, rows, threshold) if threshold is not None and m.passes else \
        "<p>No threshold in this build's config: no contact sheet.</p>"
    return head + body + stats + _hint(m.hint, keys, cfg) + sheet + "</section>"


def _shares_section(title: str, anchor: str, data: dict, hint: str, keys: list[str], cfg: PABConfig) -> str:
    parts = [f'<section id="{anchor}"><h2>{html.escape(title)}</h2>']
    for stage, entry in data.items():
        if entry is None:
            parts.append(f'<h3>{stage}</h3><p class="unmeasured">{NOT_MEASURED}</p>')
            continue
        parts.append(f"<h3>{stage}</h3>" + _img(share_chart_png(f"{title}: {stage}", entry["counts"]), f"{title} {stage}"))
        if entry.get("source") == "finished":
            parts.append("<p>from the <code>finished</code> flag: this build has no <code>caption_end</code></p>")
        for example in entry.get("examples", []):
            parts.append(f"<p><code>{html.escape(example[:200])}</code></p>")
    return "".join(parts) + _hint(hint, keys, cfg) + "</section>"


def _fraction(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def yields_section(summary: dict) -> str:
    rows = "".join(f"<tr><td>{b}</td><td>{e['images']}</td><td>{e['kept']}</td><td>{_fraction(e['kept_fraction'])}"
                   f"</td><td>~{_fraction(e['paper'])}</td></tr>" for b, e in summary["gen_pose_kept"].items())
    tp = summary["test_pairs"]
    return (
        '<section id="yields"><h2>Kept fractions beside the paper</h2>'
        "<h3>gen_pose (structural filter on generated images)</h3><table><tr><th>behavior</th><th>images</th>"
        f"<th>kept</th><th>kept fraction</th><th>paper</th></tr>{rows}</table>"
        "<p>Paper: 1,013,605 of 1,529,025 images kept at normal:anomaly 2:3, i.e. ~80% of the 6,739 x 75 normal "
        "and ~59% of the 13,648 x 75 anomaly images (C_n = normal; C_a and C_a+ = anomaly).</p>"
        "<h3>Test pairs (pose and similarity)</h3><table><tr><th>clips sampled</th><th>clips in the root</th>"
        "<th>pairs kept</th><th>projected to the root</th><th>paper</th></tr>"
        f"<tr><td>{tp['clips_sampled']}</td><td>{tp['clips_in_root']}</td><td>{tp['pairs_kept']}</td>"
        f"<td>{tp['projected_pairs']}</td><td>{tp['paper']}</td></tr></table><p>{html.escape(tp['how'])}. "
        "The sample is the first clips by name (<code>oops.limit</code>), not a random draw.</p></section>")


def rejections_section(summary: dict) -> str:
    rows = "".join(f"<tr><td>{stage}</td><td>{html.escape(reason)}</td><td>{n}</td></tr>"
                   for stage, reasons in summary["rejections"].items() for reason, n in reasons)
    return ('<section id="rejections"><h2>Why items were rejected</h2><table><tr><th>stage</th><th>reason (up to '
            f'its first colon)</th><th>items</th></tr>{rows}</table></section>')


def labels_section(summary: dict) -> str:
    paper = summary["paper"]["top_classes"]
    parts = ['<section id="labels"><h2>Attribute labels beside the paper\'s top classes</h2>']
    for stage, fields in summary["labels"].items():
        for field, classes in fields.items():
            total = sum(n for _, n in classes)
            parts.append(f"<h3>{stage}: {field}</h3><p>paper: {html.escape(', '.join(paper[field]))}</p>")
            parts.append(_img(class_chart_png(f"{stage} {field}", [tuple(c) for c in classes], total),
                              f"labels {stage} {field}"))
        if not fields:
            parts.append(f'<h3>{stage}</h3><p class="unmeasured">{NOT_MEASURED}</p>')
    return "".join(parts) + "</section>"


def render_calibration_page(store: Store, cfg: PABConfig, summary: dict) -> str:
    images = image_index(store)
    failed = {stage: c["failed"] for stage, c in summary.get("units", {}).items() if c["failed"]}
    sections = [f'<section id="failed"><h2 class="unmeasured">Units failed: {html.escape(", ".join(f"{k} {n}" for k, n in failed.items()))}</h2>'
                "<p>Their items are missing from the numbers below.</p></section>"] if failed else []
    sections += [yields_section(summary), rejections_section(summary)]
    sections += [measure_section(store, cfg, images, m, summary["filters"][m.name]) for m in MEASURES]
    sections.append(_shares_section(
        "How captions ended", "caption-ends", summary["caption_ends"],
        "An unfinished caption ran into max_new_tokens; rejected when reject_unfinished is true.",
        [f"{s}.{k}" for s in CAPTION_END_STAGES for k in ("reject_unfinished", "generation.max_new_tokens")],
        cfg))
    sections.append(_shares_section(
        "Attribute answers the parser could not read", "attribute-answers", summary["attribute_answers"],
        "Unreadable answers are rejected rows; read the examples, then the questions under prompts/.",
        ["attributes.generation.max_new_tokens", "attributes.max_words"], cfg))
    sections.append(labels_section(summary))
    nav = "<nav>" + "".join(f'<a href="#m-{i}">{html.escape(m.name)}</a>' for i, m in enumerate(MEASURES)) + "</nav>"
    template = resources.files("pab_build").joinpath("templates/calibrate.html").read_text(encoding="utf-8")
    subtitle = (f"profile {cfg.profile}: {summary['test_pairs']['clips_sampled']} OOPS! clips, "
                f"{sum(e['images'] for e in summary['gen_pose_kept'].values())} generated images "
                f"({cfg.generate.images_per_caption} per prompt). Numbers: calibration/summary.json")
    return (template.replace("__TITLE__", html.escape(f"Calibration: {cfg.profile}"))
            .replace("__SUBTITLE__", html.escape(subtitle)).replace("__BODY__", nav + "\n".join(sections)))
