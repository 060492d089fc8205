"""Prefect events of a build. ``pab.shards.published`` says a release is complete and verified at
a URL; ``prefect.yaml`` gives ``train-cmp/full`` a deployment trigger on it, so CMP training starts
on its own work pool from the published shards, without the build flow holding a GPU for it.
Where such a trigger is active, the build does not train CMP itself (:func:`downstream_training`).
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


def downstream_training() -> str | None:
    """The name of an enabled automation, on the server this run reports to, that reacts to
    ``pab.shards.published`` (``train-cmp/full``'s deployment trigger, as ``prefect deploy``
    creates it), or None. A published build with one leaves CMP training to it: trained once."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        automations = client.read_automations()
    return next((a.name for a in automations if a.enabled and _expects(a.trigger, SHARDS_PUBLISHED)), None)


def _expects(trigger, event: str) -> bool:
    """Whether ``trigger`` (or one of a compound / sequence trigger's parts) fires on ``event``."""
    if event in (getattr(trigger, "expect", None) or ()):
        return True
    return any(_expects(t, event) for t in getattr(trigger, "triggers", None) or ())
