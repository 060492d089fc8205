"""A build that publishes and trains CMP after itself trains it once: where an automation on the
server reacts to this profile's ``pab.shards.published`` (train-cmp/<profile>'s deployment trigger),
the build leaves training to it (docs/DEPLOY.md); without one (`pab run`, no trigger, a paused one,
or only another profile's) it trains in its own run."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _automation(name: str, expect: str, enabled: bool = True, compound: bool = False, profile: str | None = None):
    from prefect.automations import Automation
    from prefect.events.actions import DoNothing
    from prefect.events.schemas.automations import CompoundTrigger, EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    match = {"prefect.resource.id": "pab.shards.*"} | ({"pab.profile": profile} if profile else {})
    trigger = EventTrigger(expect={expect}, match=ResourceSpecification(match), posture=Posture.Reactive, threshold=1)
    if compound:
        trigger = CompoundTrigger(triggers=[trigger], require="any")
    return Automation(name=name, trigger=trigger, actions=[DoNothing()], enabled=enabled).create()


def test_the_build_leaves_training_to_an_active_publish_trigger(monkeypatch):
    import logging

    from prefect import flow
    from prefect.testing.utilities import prefect_test_harness

    import flows.train_cmp
    from flows.build_pab import _train_cmp_once
    from flows.events import SHARDS_PUBLISHED, downstream_training

    trained = []
    monkeypatch.setattr(flows.train_cmp, "train_cmp_flow", lambda **kw: trained.append(kw) or {"steps": 1})

    @flow
    def after_build(published):
        return _train_cmp_once("smoke", "out/x", [], published)

    with prefect_test_harness(server_startup_timeout=120):
        assert downstream_training("smoke") is None
        _automation("other event", "prefect.flow-run.Completed")
        paused = _automation("paused trigger", SHARDS_PUBLISHED, enabled=False, profile="smoke")
        full = _automation("train-cmp/full trigger", SHARDS_PUBLISHED, profile="full")
        assert downstream_training("smoke") is None  # paused, or another profile's: never fires on this build
        assert downstream_training("full") == "train-cmp/full trigger"
        assert after_build({"url": "s3://b/p", "ok": True}) == {"steps": 1} and len(trained) == 1

        active = _automation("train-cmp/smoke trigger", SHARDS_PUBLISHED, compound=True, profile="smoke")
        assert downstream_training("smoke") == "train-cmp/smoke trigger"
        said = []
        keep = logging.Handler()
        keep.emit = lambda record: said.append(record.getMessage())
        logging.getLogger("prefect.flow_runs").addHandler(keep)  # the run logger (Prefect's loggers do not propagate)
        try:
            assert after_build({"url": "s3://b/p", "ok": True}) == {"trained_by": "train-cmp/smoke trigger"}
        finally:
            logging.getLogger("prefect.flow_runs").removeHandler(keep)
        assert len(trained) == 1
        assert "CMP: not trained in this run: the publish event starts it (automation 'train-cmp/smoke trigger')" in said
        # no publish, or a publish that failed verification, emits no event: the build trains itself
        assert after_build(None) == {"steps": 1} and after_build({"url": "s3://b/p", "ok": False}) == {"steps": 1}
        assert len(trained) == 3
        active.delete(), paused.delete(), full.delete()
