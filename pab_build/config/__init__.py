"""One typed, validated configuration per profile.

Profiles live in ``configs/<name>.yaml``; every field (:mod:`.sections`) has a comment saying what it is.
Unknown keys and bad values raise :class:`ConfigError` naming the dotted key, because a typo in a
200-GPU-hour build must fail at load time, not silently fall back to a default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ..redact import redact
from .sections import (  # noqa: F401  (the sections are part of this module's API)
    AttributesConfig, CMPConfig, CONFIGS_DIR, CalibrateConfig, CaptionsConfig, ConfigError,
    FixturesConfig, FramesConfig, GenPoseConfig, GenerateConfig, GenerationSettings, ModelSpec,
    ModelsConfig, OopsConfig, PABConfig, PROMPTS_DIR, PairsConfig, PoseConfig, PromptsConfig,
    PublishConfig, QCConfig, REPO_ROOT, ReviewConfig, RunConfig, Section, ShardsConfig, stable_hash,
)


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=value`` -> ("a.b", value); the value is parsed as YAML so numbers, bools and lists work."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like dotted.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def apply_override(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    cur = data
    for i, part in enumerate(parts[:-1]):
        nxt = cur.get(part)
        if nxt is None:
            nxt = cur[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {key}: {'.'.join(parts[: i + 1])} is not a section")
        cur = nxt
    cur[parts[-1]] = value


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"unknown key {loc!r}")
        else:
            lines.append(f"{loc}: {e['msg']} (got {redact(e.get('input'))!r})")
    return "; ".join(lines)


def profile_path(profile: str) -> Path:
    p = Path(profile)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    cand = CONFIGS_DIR / f"{profile}.yaml"
    if not cand.exists():
        known = sorted(x.stem for x in CONFIGS_DIR.glob("*.yaml"))
        raise ConfigError(f"unknown profile {profile!r}; known profiles: {', '.join(known)}")
    return cand


def load_config(profile: str, overrides: list[str] | dict[str, Any] | None = None) -> PABConfig:
    """Load ``configs/<profile>.yaml`` (or a YAML path), apply ``--set`` overrides, validate. The
    models stay as written: a run pins them with ``model_lock.locked_config``, which reads the lock."""
    path = profile_path(profile)
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    items = overrides.items() if isinstance(overrides, dict) else (parse_override(o) for o in overrides or [])
    for key, value in items:
        apply_override(data, key, value)
    data.setdefault("profile", path.stem)
    return _resolve_paths(config_from_dict(data, f" {path.name}"), path.parent)


def config_from_dict(data: dict, where: str = "") -> PABConfig:
    try:
        return PABConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"invalid config{where}: {_format_errors(err)}") from None


def _resolve_paths(cfg: PABConfig, base: Path) -> PABConfig:
    """Expand ``~`` in fixture and OOPS! folders. Model paths stay as written (they are recorded in
    sample metadata as the model id); :func:`model_path` resolves them where they are loaded."""
    cfg.fixtures.models_dir = str(Path(cfg.fixtures.models_dir).expanduser())
    cfg.fixtures.sample_oops_dir = str(Path(cfg.fixtures.sample_oops_dir).expanduser())
    if cfg.oops.root and cfg.oops.root.startswith("~"):
        cfg.oops.root = str(Path(cfg.oops.root).expanduser())
    if cfg.run.models_lock is None:
        cfg.run.models_lock = str(base / "models.lock.json")
    return cfg


def model_path(cfg: PABConfig, name: str) -> str:
    """The hub id or local folder to pass to ``from_pretrained`` for model ``name``."""
    spec: ModelSpec = getattr(cfg.models, name)
    path = spec.path.replace("{models_dir}", str(Path(cfg.fixtures.models_dir).expanduser()))
    return str(Path(path).expanduser()) if path.startswith("~") else path


def model_id(cfg: PABConfig, name: str) -> str:
    """What a sample records as the model: the path as written in the profile, plus revision."""
    spec: ModelSpec = getattr(cfg.models, name)
    return spec.path if spec.revision is None else f"{spec.path}@{spec.revision}"


def qc_settings(cfg: PABConfig) -> tuple[str, list[str]]:
    """Test-caption QC policy and correction files. ``qc.policy`` wins; a profile that still sets the
    older ``test_captions.qc_policy: decisions_file`` (with ``qc_files``) means ``decisions_file``."""
    if cfg.qc.policy == "none" and cfg.test_captions.qc_policy == "decisions_file":
        return "decisions_file", list(cfg.test_captions.qc_files)
    return cfg.qc.policy, list(cfg.qc.files or cfg.test_captions.qc_files)


def oops_root(cfg: PABConfig) -> str:
    return cfg.oops.root or cfg.fixtures.sample_oops_dir
