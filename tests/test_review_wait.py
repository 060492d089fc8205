"""review.policy=wait: only the test branch pauses (a `review-wait` subflow, Prefect pause/input)
after writing the review sheet; the training branch runs to its shards meanwhile; resumed with the
reviewers' decision files, the test branch applies them and the build completes."""

import csv
import os
import threading
import time

import pytest

from pab_build.manifests import read_manifest
from pab_build.store import Store

pytestmark = pytest.mark.slow


def test_flow_pauses_for_review_and_resumes_with_decisions(tmp_path, tiny_model, models_dir, sample_oops_root):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.flow_runs import resume_flow_run
    from prefect.testing.utilities import prefect_test_harness

    from flows.build_pab import build_pab

    tiny_model("openpose"), tiny_model("resnet50")
    out = str(tmp_path / "out")
    overrides = [f"fixtures.models_dir={models_dir}", "fixtures.build_tiny_models=false",
                 f"oops.root={sample_oops_root}", "review.policy=wait", "review.wait_timeout_s=900"]
    result: dict = {}
    with prefect_test_harness(server_startup_timeout=120):
        worker = threading.Thread(
            target=lambda: result.setdefault("summary", build_pab(profile="smoke", out=out, overrides=overrides,
                                                                    train_cmp=False)), daemon=True)
        worker.start()
        template = os.path.join(out, "review", "decisions_template.csv")
        paused = None
        deadline = time.time() + 240
        with get_client(sync_client=True) as client:
            while paused is None and time.time() < deadline:
                runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                    state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED]))))
                paused = runs[0] if runs else None
                time.sleep(0.5)
        assert paused is not None, "the build did not pause for review"
        assert paused.name == "review-wait"  # the pause is the test branch's, not the whole build's
        train_shards = os.path.join(out, "manifests", "train_shards.parquet")
        while not os.path.exists(train_shards) and time.time() < deadline + 600:
            time.sleep(1)
        assert os.path.exists(train_shards), "the training branch did not finish while review was pending"
        with get_client(sync_client=True) as client:
            assert client.read_flow_run(paused.id).state.is_paused()
        assert not os.path.exists(os.path.join(out, "manifests", "test_captions.parquet"))
        assert os.path.exists(template) and os.path.exists(os.path.join(out, "review", "index.html"))
        with open(template, newline="") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 5
        rejected_pair = rows[0]["pair_key"]
        decisions = tmp_path / "alice.csv"
        with open(decisions, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            for r in rows:
                bad = r["pair_key"] == rejected_pair
                w.writerow({**r, "decision": "reject" if bad else "accept",
                            "reason": "normal behavior in both" if bad else "", "reviewer": "alice"})
        resume_flow_run(paused.id, run_input={"files": [str(decisions)]})
        worker.join(timeout=600)
    assert "summary" in result, "the build did not finish after resuming"
    review = read_manifest(Store(out), "review")
    gone = {r["clip_key"] for r in review if r["status"] == "rejected"}
    assert gone == {rejected_pair}
    assert sum(r["status"] == "ok" for r in review) == 8
    assert os.path.exists(os.path.join(out, "shards", "index.json")) and "release" in result["summary"]
