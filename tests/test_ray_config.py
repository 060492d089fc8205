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


def test_gpu_stages_ask_for_their_share_of_a_card_and_the_cluster_says_how_many_fit(monkeypatch):
    """One actor per GPU for a GPU stage; OpenPose / ResNet-50 stages two per card (ray_gpu_share);
    a CPU build asks for no GPU. On a local Ray with 2 (declared) GPUs and 4 CPUs."""
    import pytest

    ray = pytest.importorskip("ray")
    from pab_build.engine.ray_cluster import actor_resources, cluster_slots

    cuda = load_config("smoke", {"run.device": "cuda", "run.cpus_per_unit": 1})
    cpu = load_config("smoke", {"run.device": "cpu", "run.cpus_per_unit": 1})
    assert actor_resources(cuda, "generate", True) == {"num_cpus": 1, "num_gpus": 1.0}
    assert actor_resources(cuda, "gen_pose", True) == {"num_cpus": 1, "num_gpus": 0.5}
    assert actor_resources(cuda, "frames", False) == {"num_cpus": 1, "num_gpus": 0.0}
    assert actor_resources(cpu, "generate", True) == {"num_cpus": 1, "num_gpus": 0.0}
    # unset, a new local Ray turns token auth on in this process's environment (RAY_AUTH_MODE), and
    # every Ray node a later test starts would inherit it
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=4, num_gpus=2, include_dashboard=False, configure_logging=False)
    try:
        assert cluster_slots(cuda, "generate", True) == 2  # one per card
        assert cluster_slots(cuda, "gen_pose", True) == 4  # two per card, 4 CPUs
        assert cluster_slots(cpu, "generate", True) == 4  # CPUs only
    finally:
        ray.shutdown()
