"""The review pages people click through: ``review/index.html`` (accept / reject test pairs) and
``review/captions.html`` (caption QC), one self-contained HTML file each.

Images are embedded as data URIs and the script is inline, so a page opens from disk with no
server. Decisions live in the browser's localStorage (kept across reloads, keyed by the build's
items) and leave as a CSV download in exactly the columns the build reads back
(``review.DECISION_COLUMNS`` for ``review.decisions_files``, ``review.CAPTION_COLUMNS`` for
``test_captions.qc_files``). The page also exposes ``window.pabExportDecisions()`` returning that
file, for scripts and tests.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
from importlib import resources

THUMBNAIL_SIDE = 768  # large enough to judge a pose; ~2000 images still load


def image_data_uri(store, rel: str | None, side: int = THUMBNAIL_SIDE) -> str | None:
    """A JPEG data URI of the image at ``rel`` (longest side ``side``); None when there is
    none or it cannot be read (the page says so, one bad image does not stop the page)."""
    if not rel:
        return None
    try:
        image = store.read_image(rel)
    except Exception:  # noqa: BLE001 - shown as "no image" on the page
        return None
    image.thumbnail((side, side))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=88)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def build_id(kind: str, keys: list[str]) -> str:
    """Names the page's localStorage slot: the same items keep their decisions across re-exports."""
    return hashlib.sha256(json.dumps([kind, sorted(keys)]).encode()).hexdigest()[:16]


def render_page(*, kind: str, title: str, help_text: str, columns: tuple[str, ...], file_stem: str,
                items: list[dict]) -> str:
    """The page for ``kind`` "pairs" (items: key, clip_name, cosine, so_far, normal / anomaly:
    {image, caption, time_s}) or "captions" (items: key, image, caption_generated, status)."""
    data = {"kind": kind, "build_id": build_id(kind, [it["key"] for it in items]), "help": help_text,
            "columns": list(columns), "file_stem": file_stem, "items": items}
    # inside <script>, "</script" or "<!--" in a caption would end or confuse the element
    blob = json.dumps(data, ensure_ascii=False, sort_keys=True).replace("<", "\\u003c")
    template = resources.files("pab_build").joinpath("templates/review.html").read_text(encoding="utf-8")
    return template.replace("__TITLE__", html.escape(title)).replace("__DATA__", blob)
