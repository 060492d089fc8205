"""The one place that decides what a credential looks like, and hides it.

Used wherever configuration or publishing details are written or logged: ``OUT/config.yaml``
(:meth:`PABConfig.to_yaml`), the JSON form of the config that Prefect stores as flow-run
parameters (a serializer on ``PublishConfig``), run summaries, publish logs and errors. Hidden:

- the value of any key that names a credential (``secret``, ``token``, ``password``,
  ``Authorization``, ...), at any depth of a mapping (storage options, headers);
- a URL's ``user:password@`` (``s3://key:secret@bucket``, an ``endpoint_url``, ``https://TOKEN@host``),
  anywhere in a value or in free text.

Secrets reach a flow through the environment (:data:`SECRET_OVERRIDES_ENV`, set by ``pab run``) or
a Prefect Secret block (``publish.credentials_block``), never as flow-run parameters.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

MASK = "***"
_SECRET_WORDS = ("key", "secret", "token", "password", "passwd", "credential", "session", "authorization",
                 "auth", "cookie", "signature")
# scheme://userinfo@ : user:password, or a bare token used as the user name (https://TOKEN@host)
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/@\s]+)@")
SECRET_OVERRIDES_ENV = "PAB_SECRET_OVERRIDES"
# config keys whose values may hold credentials: passed to flows through the environment
SECRET_CONFIG_PREFIXES = ("publish.url", "publish.storage_options")


def is_secret_key(key: Any) -> bool:
    return any(w in str(key).lower() for w in _SECRET_WORDS)


def redact_url(text: str) -> str:
    """``s3://key:secret@bucket/x`` -> ``s3://***@bucket/x``; text without userinfo is unchanged."""
    return _URL_USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)


def redact(obj: Any) -> Any:
    """A copy of ``obj`` with credential-like keys' values replaced by ``"***"`` at any depth and
    URL passwords masked in every string."""
    if isinstance(obj, dict):
        return {k: MASK if is_secret_key(k) and v not in (None, "", {}, []) else redact(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v) for v in obj]
    if isinstance(obj, str):
        return redact_url(obj)
    return obj


def _leaf_strings(obj: Any) -> list[str]:
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in _leaf_strings(v)]
    if isinstance(obj, (list, tuple)):
        return [s for v in obj for s in _leaf_strings(v)]
    return [str(obj)] if isinstance(obj, (str, int, float)) and not isinstance(obj, bool) else []


# an access key id or user name is hidden in dumps but not scrubbed from free text: it may be a
# common word ("test") and is no secret on its own
_PUBLIC_IDS = {"key", "access_key", "aws_access_key_id", "access_key_id", "username", "user"}


def secret_values(obj: Any) -> list[str]:
    """Every secret value :func:`redact` hides (to scrub free text such as an exception message)."""
    found: list[str] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if is_secret_key(k) and str(k).lower() not in _PUBLIC_IDS:
                found += _leaf_strings(v)
            else:
                found += secret_values(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            found += secret_values(v)
    elif isinstance(obj, str):
        found += [part for m in _URL_USERINFO.finditer(obj) for part in m["userinfo"].split(":")[1:] or [m["userinfo"]]]
    return found


def scrub(text: str, secrets: list[str] | tuple[str, ...] = ()) -> str:
    """Free text with URL passwords masked and every known secret value replaced."""
    text = redact_url(str(text))
    for s in sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True):
        text = text.replace(s, MASK)
    return text


# -- secrets into flows through the environment, not flow-run parameters ----------------------
def is_secret_override(text: str) -> bool:
    key = text.split("=", 1)[0].strip()
    return any(key == p or key.startswith(p + ".") for p in SECRET_CONFIG_PREFIXES)


def stored_credential_problem(overrides: list[str] | None, **urls: str | None) -> str | None:
    """Flow-run parameters are stored in Prefect's database (and shown in its UI): name the first
    parameter that holds a credential, so a deployment run started with one fails at once instead of
    using it. ``pab run`` never sends them (:func:`split_secret_overrides`)."""
    for o in overrides or []:
        key, _, value = o.partition("=")
        key = key.strip()
        in_options = key.startswith("publish.storage_options.")
        if redact_url(value) != value or (in_options and is_secret_key(key.rsplit(".", 1)[-1])):
            return f"override {key} holds a credential"
    for name, url in urls.items():
        if url and redact_url(url) != url:
            return f"{name} holds a password"
    return None


def refuse_stored_credentials(overrides: list[str] | None, **urls: str | None) -> None:
    problem = stored_credential_problem(overrides, **urls)
    if problem:
        raise ValueError(f"{problem}: flow-run parameters are stored in Prefect's database; give credentials "
                         "through the environment or publish.credentials_block (and rotate this one)")


def split_secret_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """(overrides safe to pass as flow-run parameters, overrides that may hold credentials)."""
    return ([o for o in overrides if not is_secret_override(o)], [o for o in overrides if is_secret_override(o)])


def export_secret_overrides(secret: list[str]) -> None:
    """Hand credential-bearing overrides to the flow (same process) through the environment."""
    if secret:
        os.environ[SECRET_OVERRIDES_ENV] = json.dumps(secret)
    else:
        os.environ.pop(SECRET_OVERRIDES_ENV, None)


def secret_overrides_from_env() -> list[str]:
    raw = os.environ.get(SECRET_OVERRIDES_ENV)
    return list(json.loads(raw)) if raw else []
