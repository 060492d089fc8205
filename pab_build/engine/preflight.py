"""``pab preflight``: everything a build needs, checked in seconds before any stage runs.

Each check is a plain function returning :class:`Row` s (check, ok/problem, detail); every problem
is listed at once. Nothing here waits on the network for long: hub checks honour
``HF_HUB_OFFLINE`` and use short timeouts, botocore is kept off the instance-metadata address, and
nothing is written under OUT (a probe file in OUT's parent or OUT itself, removed at once).
"""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Callable

from ..config import PABConfig, model_path, oops_root
from ..model_lock import check_locked, model_kind, profile_models, read_lock

HUB_TIMEOUT_S = 5.0
GIB = 1 << 30
PAPER_CLIPS = 20_000
NODE_TIMEOUT_S = 60.0  # a Ray node that has not answered its checks by then is a problem


@dataclass
class Row:
    check: str
    ok: bool
    detail: str

    @property
    def problem(self) -> bool:
        return not self.ok


class PreflightFailed(RuntimeError):
    def __init__(self, rows: list[Row]):
        self.rows = rows
        super().__init__("preflight found problems:\n" + format_table([r for r in rows if r.problem]))


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


# -- checks ---------------------------------------------------------------------------------------
def check_device(cfg: PABConfig) -> list[Row]:
    device = cfg.run.device
    if not device.startswith("cuda"):
        return [Row("device", True, f"run.device={device}")]
    import torch

    if not torch.cuda.is_available():
        return [Row("device", False, f"run.device={device} but CUDA is not available on this machine")]
    need = int(device.split(":", 1)[1]) + 1 if ":" in device else 1
    have = torch.cuda.device_count()
    if have < need:
        return [Row("device", False, f"run.device={device} needs {need} GPU(s), this machine has {have}")]
    return [Row("device", True, f"{have} CUDA device(s): {torch.cuda.get_device_name(0)}")]


def _hub_reachable(path: str, revision: str | None) -> str | None:
    from huggingface_hub import HfApi

    try:
        HfApi().model_info(path, revision=revision, timeout=HUB_TIMEOUT_S)
    except Exception as e:  # noqa: BLE001 - any failure to reach it is the finding
        return f"{path}: not reachable on the hub ({type(e).__name__}: {str(e)[:120]})"
    return None


def check_models(cfg: PABConfig, stages: list[str] | None = None) -> list[Row]:
    """Each model of the profile: a local folder exists; a hub model / torchvision weights are in
    the local cache exactly as locked (offline), or locked-and-cached / reachable (online)."""
    rows = []
    lock = read_lock(cfg.run.models_lock) if cfg.run.models_lock else {}
    for name in profile_models(cfg, stages):
        path = model_path(cfg, name)
        check = f"model {name}"
        kind = model_kind(path)
        if kind == "local":
            if os.path.exists(path):
                rows.append(Row(check, True, path))
            elif "{models_dir}" in getattr(cfg.models, name).path and cfg.fixtures.build_tiny_models:
                rows.append(Row(check, True, f"{path} (tiny model, built at the start of the build)"))
            else:
                rows.append(Row(check, False, f"{path}: no such folder"))
            continue
        problem = check_locked(path, lock.get(path), hash_files=False)
        if problem is not None and not _offline() and path not in lock:
            problem = _hub_reachable(path, getattr(cfg.models, name).revision) if kind == "hub" else None
        rev = lock.get(path, {}).get("revision", "unlocked")
        rows.append(Row(check, problem is None, problem or f"{path}@{rev[:12]} cached as locked"))
    return rows


def check_oops(cfg: PABConfig) -> list[Row]:
    from .. import oops

    root = os.path.expanduser(oops_root(cfg))
    if cfg.oops.root is None and cfg.fixtures.build_sample_oops:
        return [Row("OOPS! root", True, f"{root} (sample root, written at the start of the build)")]
    if not os.path.isdir(root):
        return [Row("OOPS! root", False, f"{root}: no such folder (set oops.root or --oops-root)")]
    rows = []
    times = os.path.join(root, "annotations", "transition_times.json")
    if not os.path.isfile(times):
        rows.append(Row("OOPS! annotations", False, f"{times} missing (the frames stage needs transition times)"))
    try:
        clips = oops.load_clips(root, list(cfg.oops.splits))
        with_video = sum(1 for c in clips if c.video_path)
        splits = ", ".join(cfg.oops.splits)
        rows.append(Row("OOPS! clips", with_video > 0,
                        f"{with_video} of {len(clips)} annotated clips have a video (splits {splits})" if with_video
                        else f"{root}: no clip with a video under oops_video/<split> (splits {splits})"))
    except Exception as e:  # noqa: BLE001 - a layout or parse error is the finding
        rows.append(Row("OOPS! clips", False, f"{root}: {type(e).__name__}: {e}"[:300]))
    try:
        captions = oops.load_captions(root, ["train", "val"])
        rows.append(Row("OOPS! captions", bool(captions), f"{len(captions)} clips with caption annotations"
                        if captions else f"{root}/svos: no caption annotations (needed by prompts)"))
    except Exception as e:  # noqa: BLE001
        rows.append(Row("OOPS! captions", False, f"{root}/svos: {type(e).__name__}: {e}"[:300]))
    return rows


def estimate_build_bytes(cfg: PABConfig, clips: int) -> int:
    """A rough upper bound: test frames and pose maps, generated images, their pose maps and shards
    (images are stored twice: as outputs and inside the shards). JPEG at ~1.5 bits per pixel."""
    px = cfg.generate.height * cfg.generate.width
    generated = clips * 3 * cfg.generate.images_per_caption
    jpeg = int(px * 1.5 / 8)
    test = clips * 2 * 3 * 300_000
    return generated * jpeg * 3 + test


def check_out(cfg: PABConfig, out: str, probe: bool = False) -> list[Row]:
    """OUT writable and its free space; a remote OUT is probed (a file written and removed with this
    machine's credentials) only with ``probe`` (each Ray node's check), else the first stage tells."""
    if "://" in out and not out.startswith("file://"):
        if probe:
            return _probe_remote(cfg, out)
        return [Row("OUT", True, f"{out}: remote store (writability is checked by the first stage)")]
    out = out.removeprefix("file://")
    probe_dir = out if os.path.isdir(out) else os.path.dirname(os.path.abspath(out))
    while not os.path.isdir(probe_dir):
        probe_dir = os.path.dirname(probe_dir)
    try:
        with tempfile.NamedTemporaryFile(dir=probe_dir, prefix=".pab-preflight-"):
            pass
    except OSError as e:
        return [Row("OUT writable", False, f"{probe_dir}: {e}")]
    rows = [Row("OUT writable", True, probe_dir)]
    clips = cfg.oops.limit or _count_clips(cfg) or PAPER_CLIPS  # unknown: assume the paper's scale
    need, free = estimate_build_bytes(cfg, clips), shutil.disk_usage(probe_dir).free
    rows.append(Row("OUT free space", free >= need,
                    f"{free / GIB:.1f} GiB free, the build needs about {need / GIB:.1f} GiB ({clips} clips)"))
    return rows


def _probe_remote(cfg: PABConfig, out: str) -> list[Row]:
    import uuid

    from ..redact import redact_url
    from ..store import out_store

    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")  # never wait on the metadata address
    rel = f".pab-preflight-{uuid.uuid4().hex[:12]}"
    try:
        store = out_store(out, cfg.publish.storage_options)
        store.write_bytes(rel, b"")
        store.remove(rel)
    except Exception as e:  # noqa: BLE001 - the failure is the finding (credentials, endpoint, bucket)
        return [Row("OUT writable", False, f"{redact_url(out)}: {type(e).__name__}: {str(e)[:200]}")]
    return [Row("OUT writable", True, f"{redact_url(out)}: a probe file written and removed")]


def _count_clips(cfg: PABConfig) -> int:
    from .. import oops

    try:
        return len(oops.load_captions(os.path.expanduser(oops_root(cfg)), ["train", "val"]))
    except Exception:  # noqa: BLE001 - reported by check_oops
        return 0


def check_publish(cfg: PABConfig, url: str | None) -> list[Row]:
    from ..redact import redact_url

    url = url or cfg.publish.url
    if not url:
        return []
    in_url = redact_url(url) != url  # s3://KEY:SECRET@bucket/...: credentials ride in the URL
    url, protocol = redact_url(url), url.split("://", 1)[0] if "://" in url else "file"  # never print them
    if protocol in ("s3", "s3a"):
        os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")  # never wait on the metadata address
        if in_url:
            return [Row("publish credentials", True, f"{url}: from the URL")]
        if cfg.publish.credentials_block or {"key", "secret"} <= set(cfg.publish.storage_options):
            return [Row("publish credentials", True, f"{url}: from {cfg.publish.credentials_block or 'options'}")]
        import botocore.session

        creds = botocore.session.get_session().get_credentials()
        return [Row("publish credentials", creds is not None,
                    f"{url}: AWS credentials found ({creds.method})" if creds else
                    f"{url}: no AWS credentials (environment, ~/.aws, or publish.credentials_block)")]
    import fsspec

    try:
        fsspec.get_filesystem_class(protocol)
    except (ValueError, ImportError) as e:
        return [Row("publish", False, f"{url}: {e}")]
    return [Row("publish", True, f"{url}: {protocol} filesystem available")]


def check_cmp_init(cfg: PABConfig, stages: list[str] | None = None) -> list[Row]:
    """The whole-model init checkpoint CMP training starts from (X-VLM / APTM / a cmp.pth), when this
    build trains CMP after itself: found missing after days of generation it would cost the run."""
    path = cfg.cmp.init_checkpoint
    if stages is not None or not cfg.cmp.train_after_build or not path:
        return []
    if not os.path.isfile(path):
        return [Row("CMP init checkpoint", False, f"{path}: no such file (cmp.init_checkpoint)")]
    return [Row("CMP init checkpoint", True, f"{path} ({os.path.getsize(path) / 2**20:.0f} MiB)")]


def check_packages(cfg: PABConfig) -> list[Row]:
    needs = []
    if cfg.run.task_runner == "ray":
        needs += [("ray", "run.task_runner=ray")]
    for sec in ("test_captions", "train_captions", "attributes"):
        if getattr(cfg, sec).generation.backend == "vllm":
            needs.append(("vllm", f"{sec}.generation.backend=vllm"))
    rows = []
    for module, why in dict(needs).items():
        found = importlib.util.find_spec(module) is not None
        rows.append(Row(f"package {module}", found, f"{why}: " + ("installed" if found else "not installed")))
    return rows


# Rough GPU memory (GiB) a worker holds for each model while its stage runs: weights in the full
# profile's dtype plus the working memory of its batches (1024 px images). SDXL float16: UNet 2.57 B +
# text encoders 0.82 B parameters = 6.8 GB, plus batch-4 latents/attention and the float32 VAE decode.
MODEL_GPU_GIB = {"sdxl": 12.0, "safety_checker": 1.5, "openpose": 1.5, "resnet50": 1.0}
CUDA_CONTEXT_GIB = 1.0  # the CUDA context and allocator slack of one process
VLLM_SECTIONS = ("test_captions", "train_captions", "attributes")


def _gpu_total_gib(device: str) -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(torch.device(device)).total_memory / GIB


def check_gpu_memory(cfg: PABConfig, stages: list[str] | None = None) -> list[Row]:
    """vLLM reserves ``run.vllm_gpu_memory_utilization`` of the whole GPU when it starts; the other
    models a worker holds on that device at the same time (the test and training branches run at
    once, so SDXL, its content filter and OpenPose can be loaded beside Qwen2-VL) must fit in the rest."""
    if not any(getattr(cfg, sec).generation.backend == "vllm" for sec in VLLM_SECTIONS):
        return []
    share, devices = cfg.run.vllm_gpu_memory_utilization, cfg.run.devices or [cfg.run.device]
    others = {m: MODEL_GPU_GIB[m] for m in profile_models(cfg, stages) if m in MODEL_GPU_GIB}
    need = sum(others.values()) + CUDA_CONTEXT_GIB
    listed = ", ".join(f"{m} ~{g:.1f}" for m, g in others.items()) or "none"
    rows = []
    for device in dict.fromkeys(devices):
        total = _gpu_total_gib(device) if device.startswith("cuda") else None
        if total is None:
            rows.append(Row(f"GPU memory {device}", True, "not checked: no CUDA device here"))
            continue
        fits = max(0.0, math.floor((total - need) / total * 100) / 100)  # rounded down: it must fit
        ok = share * total + need <= total
        rows.append(Row(f"GPU memory {device}", ok, (
            f"vLLM reserves run.vllm_gpu_memory_utilization={share:g} of {total:.0f} GiB ({share * total:.0f} GiB); "
            f"the other models this worker holds need ~{need:.1f} GiB ({listed} GiB, + {CUDA_CONTEXT_GIB:g} CUDA context)"
            + ("" if ok else f": set run.vllm_gpu_memory_utilization <= {fits:.2f}, or run the vLLM stages apart"))))
    return rows


def run_checks(cfg: PABConfig, out: str, publish_url: str | None = None, until: str | None = None) -> list[Row]:
    """Every check; with ``until`` (``pab run --until STAGE``) only the models those stages load."""
    from .pipeline import stages_until

    stages = None if until is None else stages_until(until)
    checks: list[Callable[[], list[Row]]] = [
        lambda: check_device(cfg), lambda: check_models(cfg, stages), lambda: check_oops(cfg),
        lambda: check_out(cfg, out), lambda: check_publish(cfg, publish_url), lambda: check_packages(cfg),
        lambda: check_cmp_init(cfg, stages), lambda: check_gpu_memory(cfg, stages),
    ]
    if cfg.run.task_runner == "ray" and (cfg.run.ray_address or os.environ.get("RAY_ADDRESS")):
        # every node of the cluster it joins: its device, model cache and OUT access (a local Ray is this machine)
        checks.append(lambda: check_nodes(cfg, out, stages))
    rows: list[Row] = []
    for check in checks:
        try:
            rows.extend(check())
        except Exception as e:  # noqa: BLE001 - a crashing check is a problem to list, not a stop
            rows.append(Row(getattr(check, "__name__", "check"), False, f"{type(e).__name__}: {e}"[:300]))
    return rows


# -- preflight on every node --------------------------------------------------------------------
def _node_checks(cfg_data: dict[str, Any], out: str, stages: list[str] | None) -> list[tuple[str, bool, str]]:
    """On one node, with its own environment, cache and credentials."""
    from .ray_cluster import node_config

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a node checks its own cache, never the hub
    cfg = node_config(cfg_data)
    rows = []
    for check in (lambda: check_device(cfg), lambda: check_models(cfg, stages), lambda: check_out(cfg, out, probe=True)):
        try:
            rows += [(r.check, r.ok, r.detail) for r in check()]
        except Exception as e:  # noqa: BLE001 - a crashing check is a problem to list
            rows.append(("check", False, f"{type(e).__name__}: {e}"[:300]))
    return rows


def check_nodes(cfg: PABConfig, out: str, stages: list[str] | None = None) -> list:
    """Preflight's device, model and OUT checks on every alive node (pinned to it), as rows named
    ``node <ip> <id>: <check>``; a node that does not answer in time is a problem too."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from .ray_cluster import alive_nodes, connect, public_config

    connect(cfg)
    fn = ray.remote(_node_checks)
    data = public_config(cfg)
    refs = {}
    for node in alive_nodes():
        name = f"node {node['NodeManagerAddress']} {node['NodeID'][:8]}"
        refs[fn.options(num_cpus=0, max_retries=0, scheduling_strategy=NodeAffinitySchedulingStrategy(
            node["NodeID"], soft=False)).remote(data, out, stages)] = name
    ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=NODE_TIMEOUT_S)
    rows = []
    for ref, name in refs.items():
        if ref not in ready:
            rows.append(Row(name, False, f"did not answer within {NODE_TIMEOUT_S:.0f} s"))
            continue
        try:
            rows += [Row(f"{name}: {c}", ok, d) for c, ok, d in ray.get(ref)]
        except Exception as e:  # noqa: BLE001 - the node could not run the check
            rows.append(Row(name, False, f"{type(e).__name__}: {e}"[:300]))
    return rows


def format_table(rows: list[Row]) -> str:
    width = max([len("check")] + [len(r.check) for r in rows])
    lines = [f"{'check'.ljust(width)}  {'result'.ljust(7)}  detail"]
    lines += [f"{r.check.ljust(width)}  {('ok' if r.ok else 'PROBLEM').ljust(7)}  {r.detail}" for r in rows]
    return "\n".join(lines)
