"""build-pab's publish step emits `pab.shards.published` (URL without credentials, index sha256)
after a verified publish, and only then."""

from __future__ import annotations

import hashlib

from test_official import build_release_tree

from flows import events


def test_publish_task_emits_the_event_with_url_and_index_sha256(smoke_cfg, tmp_path, monkeypatch):
    from flows.build_pab import publish_task

    out, dest = str(tmp_path / "out"), str(tmp_path / "published")
    build_release_tree(out)
    emitted = []
    monkeypatch.setattr(events, "emit_shards_published", lambda *a: emitted.append(a))
    assert publish_task.fn(smoke_cfg, out, dest, "configs/smoke.yaml", ["cmp.max_steps=3"]) == {"url": dest, "ok": True}
    (url, index, build_out, profile, label, overrides), = emitted
    # training loads what the build was started with; triggers match the profile's name
    assert (url, build_out, profile, label, overrides) == (dest, out, "configs/smoke.yaml", "smoke", ["cmp.max_steps=3"])
    assert index == open(f"{dest}/shards/index.json", "rb").read()  # what the published index holds


def test_the_event_names_the_index_by_its_sha256(monkeypatch):
    import prefect.events

    sent = []
    monkeypatch.setattr(prefect.events, "emit_event", lambda **kw: sent.append(kw) or kw)
    events.emit_shards_published("s3://b/pab", b'{"splits": {}}', "/data/out", "full", overrides=["cmp.max_steps=3"])
    (kw,) = sent
    sha = hashlib.sha256(b'{"splits": {}}').hexdigest()
    assert kw["event"] == "pab.shards.published" == events.SHARDS_PUBLISHED
    assert kw["payload"] == {"url": "s3://b/pab", "index_sha256": sha, "out": "/data/out", "profile": "full",
                             "overrides": ["cmp.max_steps=3"]}
    assert kw["resource"]["prefect.resource.id"] == f"pab.shards.{sha}"
    assert kw["resource"]["pab.profile"] == "full"  # what each profile's training trigger matches
