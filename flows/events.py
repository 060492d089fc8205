"""Prefect events of a build. ``pab.shards.published`` says a release is complete and verified at
a URL; ``prefect.yaml`` gives each profile's training deployment (``train-cmp/smoke`` on the CPU
pool, ``train-cmp/full`` on the GPU pool) a trigger on the events of *its* profile (the resource
label ``pab.profile``), so CMP training starts on its own work pool from the published shards,
without the build flow holding a GPU for it. Where such a trigger is active for this build's
profile, the build does not train CMP itself (:func:`downstream_training`).
"""

from __future__ import annotations

import hashlib

SHARDS_PUBLISHED = "pab.shards.published"
PROFILE_LABEL = "pab.profile"


def shards_resource(url: str, index_sha256: str, profile: str) -> dict[str, str]:
    """The event's resource: its id names the release (the index's sha256); ``pab.profile`` lets a
    trigger take only its own profile's builds (a smoke publish never starts full training)."""
    return {"prefect.resource.id": f"pab.shards.{index_sha256}", "prefect.resource.name": url,
            PROFILE_LABEL: profile}


def emit_shards_published(url: str, index_bytes: bytes, out: str, profile: str, config_profile: str | None = None,
                          overrides: list[str] | None = None):
    """Emit the event (returns it; None where no events client could be made). ``url`` must be
    the credential-free URL (the publish report's): the event is stored on the server. ``profile``
    is what the build was started with (a name or a YAML path: what training loads),
    ``config_profile`` the profile's name (the label triggers match; default ``profile``), and
    ``overrides`` the build's own (credential-free: the flow refuses stored credentials), so the
    training sees the build's configuration."""
    from prefect.events import emit_event

    sha = hashlib.sha256(index_bytes).hexdigest()
    return emit_event(
        event=SHARDS_PUBLISHED,
        resource=shards_resource(url, sha, config_profile or profile),
        payload={"url": url, "index_sha256": sha, "out": out, "profile": profile,
                 "overrides": list(overrides or [])},
    )


def downstream_training(profile: str) -> str | None:
    """The name of an enabled automation, on the server this run reports to, that reacts to this
    profile's ``pab.shards.published`` events (``train-cmp/<profile>``'s deployment trigger, as
    ``prefect deploy`` creates it), or None. A published build with one leaves CMP training to it:
    trained once. Another profile's trigger does not count: it never fires on this build's event."""
    from prefect.client.orchestration import get_client
    from prefect.events.schemas.events import Resource

    resource = Resource(shards_resource("", "0" * 64, profile))
    with get_client(sync_client=True) as client:
        automations = client.read_automations()
    return next((a.name for a in automations if a.enabled and _fires_on(a.trigger, SHARDS_PUBLISHED, resource)), None)


def _fires_on(trigger, event: str, resource) -> bool:
    """Whether ``trigger`` (or one of a compound / sequence trigger's parts) fires on ``event`` about
    ``resource``: the event is expected and the resource matches the trigger's ``match``."""
    if event in (getattr(trigger, "expect", None) or ()):
        match = getattr(trigger, "match", None)
        return match is None or match.matches(resource)
    return any(_fires_on(t, event, resource) for t in getattr(trigger, "triggers", None) or ())
