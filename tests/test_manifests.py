import os

from pab_build import manifests


def test_every_column_is_documented_and_readme_is_current():
    undocumented = {f.name for s in manifests.STAGE_COLUMNS for f in manifests.schema(s)} - set(manifests.COLUMN_DOCS)
    assert not undocumented
    path = os.path.join(os.path.dirname(__file__), "..", "manifests", "README.md")
    with open(path, encoding="utf-8") as f:
        assert f.read().strip() == manifests.describe_markdown().strip(), "run: python -m pab_build.manifests > manifests/README.md"


def test_rejected_rows_need_a_reason():
    import pytest

    with pytest.raises(ValueError, match="no reason"):
        manifests.rows_to_table("pairs", [{"sample_key": "a", "status": "rejected", "reason": None}])
    with pytest.raises(ValueError, match="not in the manifest schema"):
        manifests.rows_to_table("pairs", [{"sample_key": "a", "status": "ok", "reason": None, "bogus": 1}])
