"""Test-caption QC follows an explicit qc.policy; older profiles' test_captions.qc_policy still works."""

import logging

from pab_build.config import load_config, qc_settings


def test_profiles_state_their_qc_policy_and_legacy_keys_migrate():
    assert qc_settings(load_config("full")) == ("wait", [])
    assert qc_settings(load_config("smoke")) == ("none", [])
    legacy = load_config("smoke", ["test_captions.qc_policy=decisions_file", "test_captions.qc_files=[a.csv]"])
    assert qc_settings(legacy) == ("decisions_file", ["a.csv"])
    assert qc_settings(load_config("smoke", ["qc.policy=decisions_file", "qc.files=[b.csv]"])) == \
        ("decisions_file", ["b.csv"])


def test_caption_qc_waits_only_when_policy_is_wait_and_files_are_missing(tmp_path, monkeypatch):
    import flows.build_pab as fb
    from pab_build.manifests import write_manifest
    from pab_build.store import Store

    out = str(tmp_path / "out")
    write_manifest(Store(out), "test_captions", [{"sample_key": "c-normal", "status": "ok", "reason": None}])
    asked = []

    class PausedForFiles:  # stands in for the Prefect pause (tests/test_review_wait.py drives a real one)
        def with_options(self, flow_run_name):
            asked.append(flow_run_name)
            return lambda what, timeout: ["qc/alice.csv"]

    monkeypatch.setattr(fb, "wait_for_files_flow", PausedForFiles())
    monkeypatch.setattr(fb, "get_run_logger", lambda: logging.getLogger("test"))
    assert fb._wait_for_caption_qc(load_config("smoke"), out) is None  # policy none: no pause
    ready = tmp_path / "bob.csv"
    ready.write_text("sample_key,caption_corrected\n")
    cfg = load_config("smoke", ["qc.policy=wait", f"qc.files=[{ready}]"])
    assert fb._wait_for_caption_qc(cfg, out) is None  # the files are there: no pause
    cfg = fb._wait_for_caption_qc(load_config("smoke", ["qc.policy=wait"]), out)
    assert asked == ["caption-qc-wait"] and cfg.qc.files == ["qc/alice.csv"]
