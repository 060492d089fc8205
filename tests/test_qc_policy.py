"""Test-caption QC follows an explicit qc.policy; older profiles' test_captions.qc_policy still works."""

from pab_build.config import load_config, qc_settings


def test_profiles_state_their_qc_policy_and_legacy_keys_migrate():
    assert qc_settings(load_config("full")) == ("wait", [])
    assert qc_settings(load_config("smoke")) == ("none", [])
    legacy = load_config("smoke", ["test_captions.qc_policy=decisions_file", "test_captions.qc_files=[a.csv]"])
    assert qc_settings(legacy) == ("decisions_file", ["a.csv"])
    assert qc_settings(load_config("smoke", ["qc.policy=decisions_file", "qc.files=[b.csv]"])) == \
        ("decisions_file", ["b.csv"])
