"""Builds on a Ray cluster (``run.task_runner: ray``): one Ray connection per build, one actor per
GPU (or CPU slot) for a stage's units, and preflight on every node.

Prefect stays on the driver: a unit's task run is created there (on the flow's own server, under
the build's flow run) and hands the unit to a free actor of the stage's :class:`RayActorPool`, so
no Ray worker imports Prefect or starts a temporary server. An actor loads its models once
(``models.loading.cached_model``) and drains units; the actors end with the stage, and their GPU
memory with them.

Nothing secret travels through Ray: the config sent to the actors has its credentials removed
(:func:`public_config`), ``runtime_env`` carries only :data:`PASSED_ENV` (no credential), and each
node finds its own credentials (its environment, ``~/.aws``, an instance role, or
``PAB_SECRET_OVERRIDES`` set on that node), as a Ray worker inherits the raylet's environment.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections import Counter
from typing import Any

from ..config import PABConfig, apply_override, config_from_dict, parse_override
from ..redact import is_secret_key, redact_url, secret_overrides_from_env

log = logging.getLogger(__name__)

# settings a worker may need and that hold no credential (a PREFECT_API_URL with a password is not passed)
PASSED_ENV = ("PREFECT_API_URL", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "PAB_LOG_LEVEL")
LOST_ACTOR_RETRIES = 3  # a unit whose actor (its node) died runs again on another actor this often


def passed_env() -> dict[str, str]:
    return {k: v for k in PASSED_ENV if (v := os.environ.get(k)) and redact_url(v) == v}


def connect(cfg: PABConfig) -> None:
    """Start or join Ray once per process (every stage and preflight reuse it). Ray's driver
    installs its own SIGTERM/SIGINT handling (``sys.exit(15)``); the process's own handlers (``pab
    run``: rc 130 and one line) are put back."""
    import ray

    if ray.is_initialized():
        return
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    in_main = threading.current_thread() is threading.main_thread()
    ctx = ray.init(address=cfg.run.ray_address or os.environ.get("RAY_ADDRESS"), log_to_driver=True,
                   runtime_env={"env_vars": passed_env()}, configure_logging=False)
    if in_main:
        for s, h in saved.items():
            if h is not None:
                signal.signal(s, h)
    log.info("Ray: %s (%d alive node(s))", getattr(ctx, "address_info", {}).get("address", "?"), len(alive_nodes()))


def disconnect() -> None:
    """End this process's Ray job: its actors and workers go; a cluster it joined stays up."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


def alive_nodes() -> list[dict[str, Any]]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def public_config(cfg: PABConfig) -> dict[str, Any]:
    """The config as sent to Ray workers: no credential (publish.url, secret storage options)."""
    data = cfg.model_dump(mode="json")
    pub = data["publish"]
    if pub.get("url") and redact_url(pub["url"]) != pub["url"]:
        pub["url"] = None  # workers never publish

    def keep(obj: Any) -> Any:
        if isinstance(obj, dict):
            return {k: keep(v) for k, v in obj.items() if not is_secret_key(k)}
        return obj

    pub["storage_options"] = keep(pub.get("storage_options") or {})
    return data


def node_config(data: dict[str, Any]) -> PABConfig:
    """On a worker: the public config plus the credentials this node was given (``PAB_SECRET_OVERRIDES``)."""
    for key, value in (parse_override(o) for o in secret_overrides_from_env()):
        apply_override(data, key, value)
    return config_from_dict(data)


def _worker_logging() -> None:
    """pab_build's INFO lines (``loaded model ...``) on the worker's stderr, which Ray shows on the driver."""
    lg = logging.getLogger("pab_build")
    if not lg.handlers:
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        lg.addHandler(h)
    lg.setLevel(os.environ.get("PAB_LOG_LEVEL", "INFO"))


class UnitWorker:
    """A Ray actor serving one stage: its models load once and stay for the stage's units."""

    def __init__(self, cfg_data: dict[str, Any], out: str, stage_name: str):
        from .pipeline import get_stage
        from .units import Context

        _worker_logging()
        self.ctx = Context.create(node_config(cfg_data), out)
        self.stage = get_stage(stage_name)

    def run(self, unit) -> tuple[str, int]:
        from .units import execute_unit

        return execute_unit(self.ctx, self.stage, unit), os.getpid()

    def ready(self) -> int:
        return os.getpid()


def actor_resources(cfg: PABConfig, stage_name: str, uses_gpu: bool) -> dict[str, float]:
    """What one actor of a stage asks Ray for: a GPU stage of a CUDA build ``run.gpus_per_unit`` of a
    GPU, or the stage's share in ``run.ray_gpu_share`` (small models share a card); every actor
    ``run.cpus_per_unit`` CPUs."""
    gpus = 0.0
    if uses_gpu and cfg.run.device.startswith("cuda"):
        gpus = cfg.run.ray_gpu_share.get(stage_name, cfg.run.gpus_per_unit)
    return {"num_cpus": cfg.run.cpus_per_unit, "num_gpus": gpus}


def cluster_slots(cfg: PABConfig, stage_name: str = "", uses_gpu: bool = False) -> int:
    """How many of a stage's actors the alive nodes hold at once."""
    import ray

    res = actor_resources(cfg, stage_name, uses_gpu)
    have = ray.cluster_resources()
    slots = [int(have.get(k, 0) / res[f"num_{k.lower()}s"] + 1e-9)
             for k in ("CPU", "GPU") if res[f"num_{k.lower()}s"] > 0]
    return max(1, min(slots)) if slots else max(1, int(have.get("CPU", 1)))


class RayActorPool:
    """A stage's actors, started as units need them (up to what the cluster holds) and ended by
    :meth:`close`. :meth:`run` runs a unit on a free actor and blocks (one thread per unit in
    flight). A unit already done is answered on the driver without an actor, so a rerun of a
    finished build starts none. An actor that died (its node was lost) is dropped and the pool
    shrinks to the nodes left; its unit runs again elsewhere.

    A unit goes only to an actor that has started. The two branches' stages share the cluster, so
    an actor asked for may wait for resources another stage's actors hold until that stage ends;
    a unit handed to it would wait too, and two stages doing so would wait for each other forever
    (seen: test_captions and train_captions on a 2-CPU cluster). A pending actor is counted against
    the cap and used once Ray has started it; meanwhile the stage's running actors take the units."""

    def __init__(self, cfg: PABConfig, out: str, stage_name: str, uses_gpu: bool):
        from .pipeline import get_stage
        from .units import Context

        self.cfg, self.out, self.stage_name = cfg, out, stage_name
        self.ctx, self.stage = Context.create(cfg, out), get_stage(stage_name)
        self.resources = actor_resources(cfg, stage_name, uses_gpu)
        self.cap = cluster_slots(cfg, stage_name, uses_gpu)
        self._data = public_config(cfg)
        self._actor_class = None  # made when the first unit needs an actor: a finished stage never touches Ray
        self._free: list = []
        self._all: list = []
        self._pending: dict = {}  # actor -> its ready() ref, until Ray has started it
        self._cond = threading.Condition()
        self.units_per_worker: Counter[int] = Counter()  # actor pid -> units it ran
        self.lost = 0

    def _take(self):
        import ray

        with self._cond:
            while True:
                self._promote_started(ray)
                if self._free:
                    return self._free.pop()
                if len(self._all) < self.cap:
                    if self._actor_class is None:
                        self._actor_class = ray.remote(UnitWorker)
                    actor = self._actor_class.options(max_restarts=0, scheduling_strategy="SPREAD", **self.resources
                                                      ).remote(self._data, self.out, self.stage_name)
                    self._all.append(actor)
                    self._pending[actor] = actor.ready.remote()
                    continue
                self._cond.wait(timeout=0.5 if self._pending else None)  # poll pending actors

    def _promote_started(self, ray) -> None:
        """Pending actors that Ray has started become free; one that failed to start is dropped."""
        if not self._pending:
            return
        refs = {ref: actor for actor, ref in self._pending.items()}
        done, _ = ray.wait(list(refs), num_returns=len(refs), timeout=0)
        for ref in done:
            actor = refs[ref]
            del self._pending[actor]
            try:
                ray.get(ref)
            except Exception as e:  # its node went, or it could not be built: the pool shrinks
                self._all.remove(actor)
                self.cap, self.lost = max(1, self.cap - 1), self.lost + 1
                log.warning("%s: a Ray actor did not start (%s)", self.stage_name, type(e).__name__)
                continue
            self._free.append(actor)

    def _give_back(self, actor) -> None:
        with self._cond:
            self._free.append(actor)
            self._cond.notify()

    def _drop(self, actor) -> None:
        with self._cond:
            if actor in self._all:
                self._all.remove(actor)
            self.cap = max(1, self.cap - 1)
            self.lost += 1
            self._cond.notify_all()

    def run(self, out: str, stage_name: str, unit) -> str:
        import ray
        from ray.exceptions import RayActorError

        from .units import unit_is_done

        if unit_is_done(self.ctx, self.stage, unit):
            return "skipped"
        for attempt in range(LOST_ACTOR_RETRIES + 1):
            actor = self._take()
            try:
                result, pid = ray.get(actor.run.remote(unit))
            except RayActorError as e:
                self._drop(actor)
                log.warning("%s unit %s: its Ray actor is gone (%s); running it on another",
                            stage_name, unit.unit_id, type(e).__name__)
                if attempt == LOST_ACTOR_RETRIES:
                    raise
                continue
            except BaseException:
                self._give_back(actor)
                raise
            self._give_back(actor)
            with self._cond:
                self.units_per_worker[pid] += 1
            return result
        raise AssertionError("unreachable")

    def close(self) -> None:
        """End the stage's actors: their models, and the GPU memory they hold, go with them."""
        import ray

        with self._cond:
            actors, self._all, self._free, self._pending = list(self._all), [], [], {}
        for a in actors:
            with contextlib.suppress(Exception):
                ray.kill(a)
