"""Publishing: to a real S3-compatible server (moto, on 127.0.0.1) killed midway and restarted, and
to a local folder; resumable, verified, credentials never in logs."""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter

import pytest
from test_official import build_release_tree

from pab_build.release import publish as publish_mod
from pab_build.release.card import write_dataset_card
from pab_build.release.publish import PublishError, publish
from pab_build.store import Store

SECRET = "s3cr3t-Do-Not-Log-7f3a9c"
BUCKET = "pab-release"


@pytest.fixture
def release(tmp_path):
    root = str(tmp_path / "out")
    build_release_tree(root)
    write_dataset_card(root)
    store = Store(root)
    objects = (["shards/test/test-000000.tar", "shards/train/train-000000.tar", "shards/train/train-000001.tar"]
               + ["README.md"] + [f"card/{n}" for n in store.listdir("card")] + ["shards/index.json"])
    return root, objects


class S3Server:
    """moto's S3 in server mode on 127.0.0.1; stop() kills the listener, start() brings it back on
    the same port. moto keeps its state in this process, so stored objects survive a restart."""

    def __init__(self):
        from moto.server import ThreadedMotoServer

        self._cls, self.port, self.server = ThreadedMotoServer, 0, None

    def start(self):
        self.server = self._cls(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        self.port = self.server.get_host_and_port()[1]

    def stop(self):
        self.server.stop()
        self.server._server.server_close()  # free the port now, so start() can bind it again

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class RequestLog(logging.Handler):
    """Requests the server answered (werkzeug logs one line per request)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())

    def object_puts(self) -> Counter:
        found = (re.search(rf'"PUT /{BUCKET}/([^ ?]+)', ln) for ln in self.lines)
        return Counter(m.group(1) for m in found if m and not m.group(1).endswith(".sha256"))


@pytest.fixture
def s3(monkeypatch):
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "AWS_PROFILE", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    requests = RequestLog()
    wz = logging.getLogger("werkzeug")
    wz.addHandler(requests)
    old_level = wz.level
    wz.setLevel(logging.INFO)
    server = S3Server()
    server.start()
    # moto keeps its state per process: start every test from an empty server
    import urllib.request

    urllib.request.urlopen(urllib.request.Request(f"{server.endpoint}/moto-api/reset", method="POST")).close()
    # the credentials travel in storage_options here, as a flow would pass a Prefect block's
    options = {"key": "AKIDEXAMPLE", "secret": SECRET, "skip_instance_cache": True,
               "client_kwargs": {"endpoint_url": server.endpoint},
               "config_kwargs": {"retries": {"max_attempts": 1}}}  # fail fast once the server is gone
    import s3fs

    s3fs.S3FileSystem(**options).mkdir(BUCKET)
    yield server, options, requests
    try:
        server.stop()
    except Exception:
        pass
    wz.removeHandler(requests)
    wz.setLevel(old_level)


def test_publish_to_s3_killed_midway_resumes_without_reuploading_and_ends_verified(release, s3, monkeypatch, caplog):
    import s3fs

    root, objects = release
    server, options, requests = s3
    url = f"s3://{BUCKET}/pab"
    caplog.set_level(logging.DEBUG)

    # run 1: the server dies right after the 2nd object is stored (before that object's sidecar)
    real_upload, done = publish_mod.upload_object, []

    def upload_then_die(src, rel, fs, target):
        real_upload(src, rel, fs, target)
        done.append(rel)
        if len(done) == 2:
            server.stop()

    monkeypatch.setattr(publish_mod, "upload_object", upload_then_die)
    with pytest.raises(PublishError) as failure:
        publish(root, url, options)
    assert done == objects[:2]
    assert "failed while" in str(failure.value) and SECRET not in str(failure.value)

    server.start()
    remote = s3fs.S3FileSystem(**options)
    assert remote.exists(f"{BUCKET}/pab/{objects[0]}") and remote.exists(f"{BUCKET}/pab/{objects[1]}")
    assert not remote.exists(f"{BUCKET}/pab/shards/index.json")  # nothing claims to be complete
    assert remote.exists(f"{BUCKET}/pab/{objects[0]}.sha256") and not remote.exists(f"{BUCKET}/pab/{objects[1]}.sha256")

    # run 2: resumes; the two complete objects are not sent again (one by its sidecar, one re-hashed)
    monkeypatch.setattr(publish_mod, "upload_object", real_upload)
    report = publish(root, url, options)
    assert report.ok, str(report)
    assert report.skipped == objects[:2]
    assert report.uploaded == objects[2:]
    assert report.verify.checked == 3 and report.card_problems == []
    puts = requests.object_puts()
    assert puts == Counter({f"pab/{rel}": 1 for rel in objects}), puts

    # run 3: everything is there already
    again = publish(root, url, options)
    assert again.ok and again.uploaded == [] and again.skipped == objects
    assert requests.object_puts() == puts

    # the published index and a shard read back as published
    assert json.loads(remote.cat_file(f"{BUCKET}/pab/shards/index.json")) == json.loads(
        Store(root).read_bytes("shards/index.json"))
    sidecar = remote.cat_file(f"{BUCKET}/pab/shards/train/train-000001.tar.sha256").decode()
    assert sidecar.split()[1] == "train-000001.tar" and len(sidecar.split()[0]) == 64

    logged = caplog.text + str(report) + str(again) + repr(report)
    assert "uploaded shards/train/train-000001.tar" in caplog.text
    assert SECRET not in logged


def test_publish_to_a_folder_repairs_tampered_shards_and_prunes_stale_ones(release, tmp_path):
    root, objects = release
    dest = tmp_path / "published"
    first = publish(root, str(dest))
    assert first.ok and first.uploaded == objects
    assert not [p for p in dest.rglob(".*")]  # no temporary files left behind

    # a remote shard altered in place (same size), a sidecar lost, an old extra shard
    shard = dest / "shards" / "train" / "train-000000.tar"
    data = bytearray(shard.read_bytes())
    data[600] ^= 0xFF
    shard.write_bytes(bytes(data))
    (dest / "shards" / "test" / "test-000000.tar.sha256").unlink()
    (dest / "shards" / "train" / "train-000007.tar").write_bytes(b"\0" * 10240)
    kept = publish(root, str(dest))  # without delete: the stale shard stays, and is reported
    assert kept.ok and kept.removed == [] and kept.stale == ["shards/train/train-000007.tar"], str(kept)
    assert (dest / "shards" / "train" / "train-000007.tar").exists() and "--delete" in str(kept)
    assert kept.repaired == ["shards/train/train-000000.tar"]
    shard.write_bytes(bytes(data))  # altered again
    second = publish(root, str(dest), delete=True)
    assert second.ok, str(second)
    assert second.uploaded == second.repaired == ["shards/train/train-000000.tar"]  # found by verification
    assert second.removed == ["shards/train/train-000007.tar"]
    assert (dest / "shards" / "test" / "test-000000.tar.sha256").exists()  # re-hashed, not re-sent
    assert shard.read_bytes() == Store(root).read_bytes("shards/train/train-000000.tar")


def test_an_old_remote_index_is_withdrawn_before_anything_is_uploaded(release, tmp_path, monkeypatch):
    root, objects = release
    dest = tmp_path / "published"
    assert publish(root, str(dest)).ok
    # the build changes: a new card; the upload then dies on its first object
    (tmp_path / "out" / "README.md").write_text("# changed\n")
    index = json.loads((tmp_path / "out" / "shards" / "index.json").read_text())
    index["splits"].pop("test")
    (tmp_path / "out" / "shards" / "index.json").write_text(json.dumps(index))

    def die(*args):
        raise ConnectionError("network gone")

    monkeypatch.setattr(publish_mod, "upload_object", die)
    with pytest.raises(PublishError, match="README.md.*network gone"):
        publish(root, str(dest), force=True)  # the test split is gone: refused without force
    assert not (dest / "shards" / "index.json").exists()


def test_a_damaged_local_build_is_not_published(release, tmp_path):
    root, _ = release
    shard = tmp_path / "out" / "shards" / "test" / "test-000000.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(PublishError, match="test-000000.tar does not match.*pab verify"):
        publish(root, str(tmp_path / "published"))
    assert not (tmp_path / "published" / "shards").exists()
    Store(root).remove("shards/index.json")
    with pytest.raises(PublishError, match="no shards/index.json"):
        publish(root, str(tmp_path / "published"))


def test_scrubber_hides_nested_and_environment_secrets(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret-value")
    scrub = publish_mod.Scrubber({"client_kwargs": {"aws_secret_access_key": "nested-secret"},
                                  "credentials": {"token": "tok-123456"}, "endpoint": "http://127.0.0.1:9"})
    text = scrub("a nested-secret, env-secret-value and tok-123456 at s3://user:pw@bucket http://127.0.0.1:9")
    assert text == "a ***, *** and *** at s3://***@bucket http://127.0.0.1:9"
