"""Keys of a build's Prefect artifacts. A key names one build (its OUT), so the UI's artifact pages
show each build's own history instead of one key shared by every build on the server."""

from __future__ import annotations

import hashlib
import re


def build_artifact_key(kind: str, out: str) -> str:
    """``<kind>-<folder name>-<8 hex of OUT>``: lowercase letters, digits and dashes (Prefect's
    rule for keys); the hash tells apart builds whose folders share a name."""
    slug = re.sub(r"[^a-z0-9]+", "-", out.rstrip("/").rsplit("/", 1)[-1].lower()).strip("-")[:40] or "build"
    kind = re.sub(r"[^a-z0-9]+", "-", kind.lower()).strip("-")
    return f"{kind}-{slug}-{hashlib.sha256(out.encode()).hexdigest()[:8]}"
