"""The result store's keys: what decides an answer, hashed. The one owner of that rule.

An answer is reused only when everything that determines it is the same:
- the endpoint (`endpoint_id`: base URL and model, credentials stripped; the embedded model by
  its name; how choices are picked when they are scored, not generated);
- the stage's template (`stage_template_key`: kind, instruction, output schema, tools, batch
  size, temperature, token limits, the worker prompt's wording, and the content of any table a
  lookup tool may read);
- the subtask's input content (`input_fingerprint`, canonical JSON that keeps types apart).
An approved plan is reused under `plan_key` (prompt, tables' metadata, endpoint, granted tools).
"""

from __future__ import annotations

import base64
import datetime as _dt
import decimal
import hashlib
import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from ..config import EndpointConfig
from ..lookups import lookup_fingerprints
from ..templates import WORKER_SYSTEM, StageContext, item_schema
from ..worker import CHOICE_CALIBRATION

KEY_VERSION = "apwa-store-1"


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _plain(value: Any) -> Any:
    """A JSON-encodable form of `value` that keeps types apart (1, 1.0, True and "1" differ).

    Non-JSON types become one-key tagged objects (`{"$dec": "1.10"}`), so the encoding is
    unambiguous and independent of the running Python's repr of those types.
    """
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return {"$bool": value}
    if isinstance(value, int):
        return value
    if isinstance(value, float):  # repr is the shortest round-tripping form; nan/inf included
        return {"$float": repr(value)}
    if isinstance(value, Mapping):
        return {"$map": sorted([_key_text(k), _plain(v)] for k, v in value.items())}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return {"$set": sorted((_plain(v) for v in value), key=_canonical)}
    if isinstance(value, _dt.datetime):  # also pandas.Timestamp (a subclass)
        return {"$datetime": value.isoformat()}
    if isinstance(value, (_dt.date, _dt.time)):
        return {"$" + type(value).__name__: value.isoformat()}
    if isinstance(value, _dt.timedelta):
        return {"$timedelta": value.total_seconds()}
    if isinstance(value, decimal.Decimal):
        return {"$decimal": str(value)}
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"$bytes": base64.b64encode(bytes(value)).decode("ascii")}
    module = type(value).__module__
    if module.startswith("numpy"):
        tolist = getattr(value, "tolist", None)
        if tolist is not None:  # numpy scalar or array: its Python equivalent
            return _plain(tolist())
    if module.startswith("pandas"):
        if str(value) in ("<NA>", "NaT"):  # pd.NA / pd.NaT (NaT is not a datetime instance here)
            return {"$missing": str(value)}
        if hasattr(value, "isoformat"):
            return {"$datetime": value.isoformat()}
    return {"$" + f"{module}.{type(value).__qualname__}": str(value)}


def _key_text(key: Any) -> str:
    return key if isinstance(key, str) else _canonical(_plain(key))


def _canonical(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True)


def canonical_json(value: Any) -> str:
    """The canonical JSON text of a row dict, a list of rows or reduce items (stable across runs)."""
    return _canonical(_plain(value))


def input_fingerprint(value: Any) -> str:
    """Hash of a subtask's input content (row dict, list of rows, or reduce items)."""
    return _sha(canonical_json(value))


def endpoint_identity(base_url: str, model: str) -> str:
    """The text "base URL + model", with any credentials in the URL removed.

    The user part (`https://user:key@host`) and the query (`?api-key=...`) are dropped: neither
    changes which model answers, and both may hold a key. A trailing slash is not significant.
    """
    parts = urlsplit(base_url.strip())
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    url = urlunsplit((parts.scheme.lower(), host.lower(), parts.path.rstrip("/"), "", ""))
    return f"{url} {model}"


def template_fingerprint(
    instruction: str,
    outputs_schema: dict[str, Any],
    tools: list[str],
    batch_size: int,
    kind: str,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """Hash of a stage's rendered template: what every subtask of the stage shares.

    `extra` takes anything else that changes answers (temperature, max_tokens, a prompt version);
    a replicate stage must put the replica number in the subtask's inputs, or every replica
    would get the first replica's stored answer.
    """
    return _sha(
        canonical_json(
            {
                "instruction": instruction,
                "outputs": outputs_schema,
                "tools": sorted(tools),
                "batch_size": batch_size,
                "kind": kind,
                "extra": dict(extra or {}),
            }
        )
    )


def subtask_key(endpoint: str, template: str, inputs: str) -> str:
    """The store key of one subtask: a hash of endpoint identity, template and input hashes."""
    return _sha("\x00".join((KEY_VERSION, endpoint, template, inputs)))


def plan_key(
    prompt: str, tables_metadata_json: list[str], endpoint_identity: str, granted_tools: list[str]
) -> str:
    """Key of an approved plan: prompt, tables' metadata, endpoint and granted tools.

    Cell options such as --out or --wait are not part of it, so they do not force a new plan.
    """
    return _sha(
        canonical_json(
            [
                KEY_VERSION,
                prompt,
                sorted(tables_metadata_json),
                endpoint_identity,
                sorted(granted_tools),
            ]
        )
    )


def endpoint_id(endpoint: EndpointConfig) -> str:
    """Who answers, for store keys: base URL + model (+ how choices are picked, if not generated).

    The embedded model is named by its model alone: its port changes with every kernel, its
    answers do not.
    """
    if endpoint.embedded:
        identity = f"embedded {endpoint.model}"
    else:
        identity = endpoint_identity(endpoint.base_url, endpoint.model)
    if endpoint.choice_scoring != "generate":
        # Scored choices are other answers than generated ones: never serve one for the other.
        identity += f" choices:{endpoint.choice_scoring}/{CHOICE_CALIBRATION}"
    return identity


def stage_template_key(ctx: StageContext, batch_size: int) -> str:
    """The template part of a stage's keys, read from the very context its workers receive."""
    return template_fingerprint(
        ctx.instruction,
        item_schema(ctx.outputs),
        list(ctx.tools),
        batch_size,
        ctx.kind,
        extra={
            "temperature": ctx.temperature,
            "max_tokens": ctx.max_tokens,
            "max_input_chars": ctx.max_input_chars,
            "worker_prompt": WORKER_SYSTEM,
            # The tables a lookup may read (empty without lookups).
            **lookup_fingerprints(ctx.tools),
            # Answers that carry a confidence are other answers (absent: keys stay as they were).
            **({"confidence": True} if ctx.confidence else {}),
        },
    )


def embedding_key(where: str, model: str, text: str) -> str:
    """The store key of one text's embedding: who embedded it (endpoint and model) and the text.

    `where` is a base URL (its credentials dropped, as for answers) or a name for a model run in
    this process. Join and dedupe blocking store vectors under it, so a re-run embeds nothing.
    """
    return _sha("\x00".join((KEY_VERSION, "embedding", endpoint_identity(where, model), text)))
