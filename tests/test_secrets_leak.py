"""A secret planted in each of the five places (the --publish URL's password, publish.url's
password, an endpoint_url's password, a headers.Authorization value, storage_options.secret) is
found nowhere in OUT, the output and logs of `pab run`, or the Prefect database, whether the
publish step succeeds (moto S3) or fails."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from test_official import build_release_tree
from test_publish import BUCKET, s3  # noqa: F401 - fixture

from pab_build.config import CONFIGS_DIR
from pab_build.engine.units import Stage

pytestmark = pytest.mark.slow  # a Prefect test server and two flow runs

URL_PW, CFG_URL_PW, ENDPOINT_PW, AUTH, SECRET = ("plantedUrlPw7a1", "plantedCfgUrlPw7b2", "plantedEndpointPw7c3",
                                                 "plantedAuthTok7d4", "plantedSecret7e5")
PLANTED = (URL_PW, CFG_URL_PW, ENDPOINT_PW, AUTH, SECRET)


def _files_text(folder: str) -> dict[str, bytes]:
    out = {}
    for dirpath, _, names in os.walk(folder):
        for n in names:
            p = os.path.join(dirpath, n)
            if os.path.isfile(p):
                out[p] = Path(p).read_bytes()
    return out


def _leaks(blobs: dict[str, bytes]) -> list[str]:
    return [f"{name}: {s}" for name, data in blobs.items() for s in PLANTED if s.encode() in data]


def test_planted_secrets_reach_no_output_log_or_database(s3, tmp_path, monkeypatch, capfd):
    import prefect.settings
    from prefect.logging.handlers import APILogWorker
    from prefect.testing.utilities import prefect_test_harness

    import flows.build_pab as fb
    from flows.cli import main

    server, options, _requests = s3
    # the release is prebuilt; one stage with no work still runs as a subflow whose parameters
    # (the whole config) Prefect stores
    monkeypatch.setattr(fb, "stages_until", lambda until: ["frames"])
    monkeypatch.setattr(fb, "get_stage", lambda name: Stage("frames", lambda ctx: [], lambda ctx, u: [],
                                                            config_keys=("frames",)))
    for var in ("PAB_SECRET_OVERRIDES", "PREFECT_LOGGING_EXTRA_LOGGERS"):
        monkeypatch.delenv(var, raising=False)
    profile = yaml.safe_load((CONFIGS_DIR / "smoke.yaml").read_text())
    profile["publish"] = {"url": f"s3://AKIDEXAMPLE:{CFG_URL_PW}@{BUCKET}/from-config"}
    profile_path = tmp_path / "leaky.yaml"
    profile_path.write_text(yaml.safe_dump(profile))
    common = [str(profile_path), "--no-cmp", "--set", "fixtures.build_tiny_models=false",
              "--set", "fixtures.build_sample_oops=false", "--set", f"publish.storage_options.secret={SECRET}",
              "--set", "publish.storage_options.skip_instance_cache=true"]
    ok_out, bad_out = str(tmp_path / "ok"), str(tmp_path / "bad")
    build_release_tree(ok_out)
    build_release_tree(bad_out)

    with prefect_test_harness(server_startup_timeout=120):
        db_url = prefect.settings.PREFECT_SERVER_DATABASE_CONNECTION_URL.value()
        # 1: publishes to moto; the access key and secret come from the --publish URL
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", server.endpoint)
        with pytest.raises(SystemExit) as first:
            main(["run", *common, "--out", ok_out, "--publish", f"s3://AKIDEXAMPLE:{URL_PW}@{BUCKET}/pab"])
        assert first.value.code == 0
        # 2: an endpoint with a password and an Authorization header: the publish step fails
        monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
        with pytest.raises(SystemExit) as second:
            main(["run", *common, "--out", bad_out,
                  "--set", f"publish.storage_options.client_kwargs.endpoint_url=http://minio:{ENDPOINT_PW}@{server.endpoint[7:]}",
                  "--set", f"publish.storage_options.headers.Authorization=Bearer {AUTH}"])
        assert second.value.code == 2  # the publish step fails: one line `pab: error: ...` (a user setting)
        APILogWorker.drain_all(timeout=30)
        db_dir = os.path.dirname(db_url.split("///", 1)[1])
        database = _files_text(db_dir)

    captured = capfd.readouterr()
    import s3fs

    remote = s3fs.S3FileSystem(**options)
    assert remote.exists(f"{BUCKET}/pab/shards/index.json")  # run 1 did publish
    leaks = _leaks(database) + _leaks(_files_text(ok_out)) + _leaks(_files_text(bad_out))
    leaks += _leaks({"stdout": captured.out.encode(), "stderr": captured.err.encode()})
    assert leaks == []
    # the checks can fail: the database holds the runs' parameters and logs, OUT the config
    db_bytes = b"".join(database.values())
    assert b"build summary" in db_bytes
    assert b"leaky" in db_bytes and b"publish.storage_options" not in db_bytes  # parameters stored, secrets not
    assert b"s3://***@" in db_bytes  # the stage subflow's config parameter, redacted
    config = yaml.safe_load(Path(ok_out, "config.yaml").read_text())
    assert config["publish"]["storage_options"]["secret"] == "***"
    summary = json.loads(captured.out[captured.out.index("{"): captured.out.index("\noutputs:")])
    assert summary["publish"] == {"url": f"s3://***@{BUCKET}/pab", "ok": True}
    assert "AUTHORIZATION" in captured.err or "publish" in captured.err  # run 2's failure was reported
