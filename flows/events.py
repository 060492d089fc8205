"""Prefect events of a build. ``pab.shards.published`` says a release is complete and verified at
a URL; ``prefect.yaml`` gives ``train-cmp/full`` a deployment trigger on it, so CMP training starts
on its own work pool from the published shards, without the build flow holding a GPU for it.
"""

from __future__ import annotations

import hashlib

SHARDS_PUBLISHED = "pab.shards.published"


def emit_shards_published(url: str, index_bytes: bytes, out: str, profile: str):
    """Emit the event (returns it; None where no events client could be made). ``url`` must be
    the credential-free URL (the publish report's): the event is stored on the server."""
    from prefect.events import emit_event

    sha = hashlib.sha256(index_bytes).hexdigest()
    return emit_event(
        event=SHARDS_PUBLISHED,
        resource={"prefect.resource.id": f"pab.shards.{sha}", "prefect.resource.name": url},
        payload={"url": url, "index_sha256": sha, "out": out, "profile": profile},
    )
