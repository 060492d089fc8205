"""One redaction function for every place a secret could be written or logged."""

from __future__ import annotations

import json

import pytest
import yaml

from pab_build.config import load_config
from pab_build.redact import redact, redact_url, scrub, secret_values, split_secret_overrides
from pab_build.release.publish import Scrubber, url_credentials

URL_PW, CFG_URL_PW, ENDPOINT_PW, AUTH, SECRET = "urlPw-1111", "cfgUrlPw-2222", "endpointPw-3333", "authTok-4444", "secret-5555"
OPTIONS = {"secret": SECRET, "key": "AKIDEXAMPLE", "headers": {"Authorization": f"Bearer {AUTH}"},
           "client_kwargs": {"endpoint_url": f"http://minio:{ENDPOINT_PW}@127.0.0.1:9000", "region_name": "x"}}
ALL = (URL_PW, CFG_URL_PW, ENDPOINT_PW, AUTH, SECRET)


@pytest.mark.parametrize("value, hidden, kept", [
    (f"s3://AKID:{URL_PW}@bucket/pab", URL_PW, "s3://***@bucket/pab"),
    ({"url": f"https://u:{CFG_URL_PW}@host/x"}, CFG_URL_PW, "https://***@host/x"),
    ({"client_kwargs": {"endpoint_url": f"http://minio:{ENDPOINT_PW}@127.0.0.1:9000"}}, ENDPOINT_PW, "127.0.0.1:9000"),
    ({"headers": {"Authorization": f"Bearer {AUTH}"}}, AUTH, "headers"),
    ({"secret": SECRET, "anon": False}, SECRET, "anon"),
])
def test_each_kind_of_credential_is_redacted_and_scrubbed(value, hidden, kept):
    text = json.dumps(redact(value))
    assert hidden not in text and kept in text
    assert hidden in " ".join(secret_values(value))
    assert hidden not in scrub(f"failed: {json.dumps(value)}", secret_values(value))


def test_plain_values_are_left_alone():
    assert redact_url("s3://bucket/pab") == "s3://bucket/pab"
    assert redact({"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}, "anon": True}) == \
        {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}, "anon": True}
    assert "AKIDEXAMPLE" not in secret_values(OPTIONS)  # an access key id is no secret (and may be a word)


def test_config_dumps_never_hold_a_credential():
    cfg = load_config("smoke", {"publish.url": f"s3://AKID:{CFG_URL_PW}@bucket/pab", "publish.storage_options": OPTIONS})
    assert cfg.publish.storage_options["secret"] == SECRET  # the object keeps them for the publish step
    for text in (cfg.to_yaml(), json.dumps(cfg.model_dump(mode="json")), cfg.model_dump_json()):
        assert not [s for s in ALL if s in text], text
    assert yaml.safe_load(cfg.to_yaml())["publish"]["url"] == "s3://***@bucket/pab"


def test_a_bad_value_is_reported_without_its_secret():
    from pab_build.config import ConfigError

    with pytest.raises(ConfigError) as err:
        load_config("smoke", {"publish.storage_options": [f"s3://u:{SECRET}@x"]})
    assert "publish.storage_options" in str(err.value) and SECRET not in str(err.value)


def test_publish_scrubber_and_s3_url_credentials():
    scrubber = Scrubber(OPTIONS, f"s3://AKID:{URL_PW}@bucket/pab")
    text = scrubber(f"error at s3://AKID:{URL_PW}@bucket {OPTIONS}")
    assert not [s for s in ALL if s in text]
    url, options = url_credentials(f"s3://AKID:{URL_PW}@bucket/pab", {"anon": False})
    assert url == "s3://bucket/pab" and options == {"anon": False, "key": "AKID", "secret": URL_PW}
    assert url_credentials("s3://bucket/pab", {}) == ("s3://bucket/pab", {})


def test_credential_bearing_overrides_are_kept_out_of_flow_parameters():
    public, secret = split_secret_overrides(["cmp.lr=0.1", f"publish.url=s3://a:{URL_PW}@b", "publish.force=true",
                                             f"publish.storage_options.secret={SECRET}"])
    assert public == ["cmp.lr=0.1", "publish.force=true"]
    assert len(secret) == 2


def test_flows_refuse_credentials_in_their_stored_parameters(tmp_path):
    from flows.build_pab import build_pab
    from flows.train_cmp import train_cmp_flow
    from pab_build.redact import stored_credential_problem

    assert stored_credential_problem(["cmp.lr=0.1", "publish.credentials_block=pab-s3",
                                      "publish.storage_options.endpoint_url=http://minio:9000"]) is None
    assert "storage_options.secret" in stored_credential_problem([f"publish.storage_options.secret={SECRET}"])
    assert "publish.url" in stored_credential_problem([f"publish.url=s3://a:{URL_PW}@b"])
    assert "shards" in stored_credential_problem([], shards=f"https://{SECRET}@hub.example/pab")
    # the flows themselves (called as a deployment would): refused before anything runs or is written
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="stored in Prefect's database") as err:
        build_pab.fn(profile="smoke", out=str(out), overrides=[f"publish.storage_options.secret={SECRET}"])
    assert SECRET not in str(err.value) and not out.exists()
    with pytest.raises(ValueError, match="stored in Prefect's database") as err:
        train_cmp_flow.fn(profile="smoke", shards=f"s3://a:{URL_PW}@b/pab", out=str(out))
    assert URL_PW not in str(err.value) and not out.exists()
