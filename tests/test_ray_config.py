"""What a Ray build sends its nodes: the config without credentials, runtime_env without secrets;
a node adds its own credentials (PAB_SECRET_OVERRIDES in its environment)."""

import json

from pab_build.config import load_config
from pab_build.engine.ray_cluster import node_config, passed_env, public_config
from pab_build.redact import SECRET_OVERRIDES_ENV


def test_nodes_get_no_credential_and_add_their_own(monkeypatch):
    cfg = load_config("smoke", {"publish.url": "s3://AKID:wJalr-driver@bucket/pab",
                                "publish.storage_options": {"key": "AKID", "secret": "wJalr-driver",
                                                            "client_kwargs": {"endpoint_url": "http://s3:9000"}}})
    data = public_config(cfg)
    assert "wJalr-driver" not in json.dumps(data) and "AKID" not in json.dumps(data)
    assert data["publish"]["storage_options"] == {"client_kwargs": {"endpoint_url": "http://s3:9000"}}
    monkeypatch.setenv(SECRET_OVERRIDES_ENV, json.dumps(["publish.storage_options.secret=node-own"]))
    node = node_config(data)
    assert node.publish.storage_options["secret"] == "node-own"
    assert node.model_dump(exclude={"publish"}) == cfg.model_dump(exclude={"publish"})


def test_runtime_env_passes_only_settings_without_credentials(monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", "http://10.0.0.2:4200/api")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.delenv("PAB_LOG_LEVEL", raising=False)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "never")
    monkeypatch.setenv("PREFECT_API_KEY", "never")
    assert passed_env() == {"PREFECT_API_URL": "http://10.0.0.2:4200/api", "HF_HUB_OFFLINE": "1"}
    monkeypatch.setenv("PREFECT_API_URL", "http://user:pw@10.0.0.2:4200/api")  # a password in it: not passed
    assert "PREFECT_API_URL" not in passed_env()
