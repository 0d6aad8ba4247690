"""What the fault proxy's HTTP API reads and writes: proxies and toxics, validated.

The shapes, defaults and error statuses are Toxiproxy's (HTTP API v2), so that its own clients
drive this proxy unchanged: a toxic defaults to stream "downstream", toxicity 1.0 and the name
"<type>_<stream>"; unknown fields are ignored; errors are ``{"error": ..., "status": ...}``.
Where Toxiproxy accepts nonsense (a negative latency, a toxicity of 7) this refuses it with 400.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

STREAMS = ("upstream", "downstream")
# Each toxic type and its attributes (all whole numbers, 0 when not given), as in Toxiproxy:
# latency ms ± jitter ms; bandwidth KB/s; slow_close delay ms; timeout ms (0: never closes);
# reset_peer timeout ms; slicer sizes in bytes and delay in µs; limit_data bytes.
TOXIC_TYPES: Mapping[str, tuple[str, ...]] = {
    "latency": ("latency", "jitter"),
    "bandwidth": ("rate",),
    "slow_close": ("delay",),
    "timeout": ("timeout",),
    "reset_peer": ("timeout",),
    "slicer": ("average_size", "size_variation", "delay"),
    "limit_data": ("bytes",),
}
ATTRIBUTE_MAX = 2**53  # beyond any sensible millisecond or byte count; JSON-safe


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def as_json(self) -> dict[str, Any]:
        return {"error": self.message, "status": self.status}


def bad_body(detail: str) -> ApiError:
    return ApiError(400, f"bad request body: {detail}")


def missing(name: str) -> ApiError:
    return ApiError(400, f"missing required field: {name}")


PROXY_NOT_FOUND = ApiError(404, "proxy not found")
PROXY_EXISTS = ApiError(409, "proxy already exists")
TOXIC_NOT_FOUND = ApiError(404, "toxic not found")
TOXIC_EXISTS = ApiError(409, "toxic already exists")
INVALID_STREAM = ApiError(400, "stream was invalid, can be either upstream or downstream")
INVALID_TOXIC_TYPE = ApiError(400, "invalid toxic type")


@dataclass
class Toxic:
    name: str
    type: str
    stream: str
    toxicity: float
    attributes: dict[str, int]
    version: int = 0  # bumped on every update, so that connections re-roll toxicity

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.type,
            "stream": self.stream,
            "toxicity": self.toxicity,
            "attributes": dict(self.attributes),
        }

    def attr(self, key: str) -> int:
        return self.attributes.get(key, 0)


@dataclass(frozen=True)
class ProxySpec:
    name: str
    listen: str
    upstream: str
    enabled: bool = True


def _object(body: object) -> Mapping[str, Any]:
    if not isinstance(body, dict):
        raise bad_body("expected a JSON object")
    return body


def _string(body: Mapping[str, Any], key: str, default: str | None = None) -> str:
    value = body.get(key, default)
    if value is None:
        raise missing(key)
    if not isinstance(value, str):
        raise bad_body(f"{key} must be a string")
    if "\x00" in value or len(value) > 255:
        raise bad_body(f"{key} is not a sane string")
    return value


def _bool(body: Mapping[str, Any], key: str, default: bool) -> bool:
    value = body.get(key, default)
    if not isinstance(value, bool):
        raise bad_body(f"{key} must be true or false")
    return value


def parse_address(address: str, what: str) -> tuple[str, int]:
    """ "host:port" (IPv6 in brackets) -> (host, port); port 0 means any free port."""
    host, sep, port = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise bad_body(f"{what} must be host:port, got {address!r}")
    return host or "0.0.0.0", int(port)  # noqa: S104 (Toxiproxy's meaning of ":port")


def proxy_spec(body: object) -> ProxySpec:
    """A new proxy (POST /proxies, one entry of POST /populate)."""
    data = _object(body)
    name = _string(data, "name")
    if not name or "/" in name:
        raise missing("name") if not name else bad_body("name must not contain '/'")
    upstream = _string(data, "upstream")
    if not upstream:
        raise missing("upstream")
    parse_address(upstream, "upstream")
    listen = _string(data, "listen", "127.0.0.1:0") or "127.0.0.1:0"
    parse_address(listen, "listen")
    return ProxySpec(name, listen, upstream, _bool(data, "enabled", True))


def proxy_update(current: ProxySpec, body: object) -> ProxySpec:
    """POST/PATCH /proxies/{name}: given fields replace the current ones."""
    data = _object(body)
    listen = _string(data, "listen", current.listen)
    upstream = _string(data, "upstream", current.upstream)
    parse_address(listen, "listen")
    parse_address(upstream, "upstream")
    return ProxySpec(current.name, listen, upstream, _bool(data, "enabled", current.enabled))


def _toxicity(data: Mapping[str, Any], default: float) -> float:
    value = data.get("toxicity", default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise bad_body("toxicity must be a number")
    if math.isnan(value) or not 0 <= value <= 1:
        raise bad_body("toxicity must be between 0 and 1")
    return float(value)


def _attributes(kind: str, raw: object, current: Mapping[str, int]) -> dict[str, int]:
    if raw is None:
        return dict(current)
    if not isinstance(raw, dict):
        raise bad_body("attributes must be an object")
    merged = dict(current)
    for key in TOXIC_TYPES[kind]:
        if key not in raw:
            continue
        value = raw[key]
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad_body(f"attributes.{key} must be a whole number")
        if not 0 <= value <= ATTRIBUTE_MAX:
            raise bad_body(f"attributes.{key} must be between 0 and {ATTRIBUTE_MAX}")
        merged[key] = value
    return merged


def new_toxic(body: object) -> Toxic:
    data = _object(body)
    kind, stream = data.get("type"), data.get("stream", "downstream")
    if not isinstance(stream, str) or stream not in STREAMS:
        raise INVALID_STREAM
    if not isinstance(kind, str) or kind not in TOXIC_TYPES:
        raise INVALID_TOXIC_TYPE
    name = data.get("name") or f"{kind}_{stream}"
    if not isinstance(name, str) or "/" in name or len(name) > 255:
        raise bad_body("name must be a string without '/'")
    zero = dict.fromkeys(TOXIC_TYPES[kind], 0)
    return Toxic(name, kind, stream, _toxicity(data, 1.0),
                 _attributes(kind, data.get("attributes"), zero))  # fmt: skip


def updated_toxic(toxic: Toxic, body: object) -> Toxic:
    """POST/PATCH /proxies/{p}/toxics/{t}: attributes merge, toxicity replaces; type, stream
    and name stay."""
    data = _object(body)
    return dataclasses.replace(
        toxic,
        toxicity=_toxicity(data, toxic.toxicity),
        attributes=_attributes(toxic.type, data.get("attributes"), toxic.attributes),
        version=toxic.version + 1,
    )
