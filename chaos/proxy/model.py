"""What the fault proxy's HTTP API reads and writes: proxies and toxics, decoded as Toxiproxy does.

Toxiproxy 2.12.0 decodes request bodies with Go's encoding/json into its structs (api.go,
toxic_collection.go, proxy_collection.go); this module reproduces what that accepts, refuses and
says: a field of the wrong JSON type is a 400 "bad request body: json: cannot unmarshal ...",
null leaves a field at its default, unknown fields are ignored, keys match case-insensitively,
whatever follows the first JSON value is ignored. Out-of-range values Toxiproxy accepts (a
negative latency, a toxicity of 7) are accepted and shown back as given; the data path reads a
negative attribute as 0, which is what Toxiproxy's toxics do with it.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

STREAMS = ("upstream", "downstream")
# Each toxic type and its attributes in the order of Toxiproxy's structs (toxics/*.go; all Go
# integers, 0 when not given): latency ms ± jitter ms; bandwidth KB/s; slow_close delay ms;
# timeout ms (0: never closes); reset_peer timeout ms; slicer sizes in bytes and delay in µs;
# limit_data bytes. "noop" (toxics/noop.go) is registered there too and passes data unchanged.
TOXIC_TYPES: Mapping[str, tuple[str, ...]] = {
    "noop": (),
    "latency": ("latency", "jitter"),
    "bandwidth": ("rate",),
    "slow_close": ("delay",),
    "timeout": ("timeout",),
    "reset_peer": ("timeout",),
    "slicer": ("average_size", "size_variation", "delay"),
    "limit_data": ("bytes",),
}
_STRUCTS = {"noop": "NoopToxic", "latency": "LatencyToxic", "bandwidth": "BandwidthToxic",
            "slow_close": "SlowCloseToxic", "timeout": "TimeoutToxic",
            "reset_peer": "ResetToxic", "slicer": "SlicerToxic",
            "limit_data": "LimitDataToxic"}  # fmt: skip
_INT_TYPES = {"slicer": "int"}  # Go's int (64-bit); every other attribute is an int64
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
FLOAT32_MAX = 3.4028234663852886e38
POPULATE_ITEM = 'struct { toxiproxy.Proxy; Enabled *bool "json:\\"enabled\\"" }'


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


def float32(value: float) -> float:
    """``value`` as Go's float32 holds it, as the shortest decimal that reads back the same
    (so that json.dumps prints what Go prints)."""
    try:
        single = struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:
        return value
    for digits in range(1, 10):
        text = f"{single:.{digits}g}"
        if struct.unpack("f", struct.pack("f", float(text)))[0] == single:
            return float(text)
    return float(single)


def go_number(value: float) -> float | int:
    """Go prints an integral float without ".0"."""
    return int(value) if value.is_integer() and abs(value) < 1e21 else value


@dataclass
class Toxic:
    name: str
    type: str
    stream: str  # "upstream" or "downstream": what the data path matches on
    toxicity: float
    attributes: dict[str, int]
    version: int = 0  # bumped on every update, so that connections re-roll toxicity
    stream_given: str = ""  # the stream as the request spelled it; Toxiproxy shows it back

    def as_json(self) -> dict[str, Any]:
        """Go's field order (toxics/toxic.go ToxicWrapper): attributes first."""
        return {
            "attributes": {key: self.attributes.get(key, 0) for key in TOXIC_TYPES[self.type]},
            "name": self.name,
            "type": self.type,
            "stream": self.stream_given or self.stream,
            "toxicity": go_number(self.toxicity),
        }

    def attr(self, key: str) -> int:
        """A negative value acts as 0, as in Toxiproxy's toxics (no delay, no bytes)."""
        return max(0, self.attributes.get(key, 0))


@dataclass(frozen=True)
class ProxySpec:
    name: str
    listen: str
    upstream: str
    enabled: bool = True



def parse_address(address: str, what: str) -> tuple[str, int]:
    """ "host:port" (IPv6 in brackets) -> (host, port); port 0 means any free port."""
    host, sep, port = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise bad_body(f"{what} must be host:port, got {address!r}")
    return host or "0.0.0.0", int(port)  # noqa: S104 (Toxiproxy's meaning of ":port")


def go_listen(address: str, op: str = "listen tcp") -> str:
    """``address`` as Go's net.ResolveTCPAddr writes it ("localhost:0" -> "127.0.0.1:0"), or
    Toxiproxy's 500 with Go's message when Go could not listen on it."""
    if not address:
        return ":0"  # Go's TCPAddr{} (any address, any port)
    host, sep, port = address.rpartition(":")
    prefix = f"{op}: " if op else ""
    if not sep:
        raise ApiError(500, f"{prefix}address {address}: missing port in address")
    if not port.isdigit():
        raise ApiError(500, f"{prefix}lookup tcp/{port}: unknown port")
    if int(port) > 65535:
        raise ApiError(500, f"{prefix}address {port}: invalid port")
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if bare == "localhost":
        bare = "127.0.0.1"
    return f"[{bare}]:{int(port)}" if ":" in bare else f"{bare}:{int(port)}"


# --- Go's encoding/json, as far as Toxiproxy's bodies reach it -----------------------------


class _Number(float):
    text: str


def _number(text: str) -> _Number:
    value = _Number(text)
    value.text = text
    return value


def _refuse_constant(text: str) -> Any:
    raise ValueError(text)


_CONTEXT = {
    "Expecting value": "looking for beginning of value",
    "Expecting ':' delimiter": "after object key",
    "Expecting ',' delimiter": "after object key:value pair",
    "Expecting property name enclosed in double quotes":
        "looking for beginning of object key string",
}


def load(raw: bytes) -> Any:
    """The first JSON value of ``raw`` (Go's json.Decoder ignores what follows it)."""
    text = raw.decode("utf-8", errors="replace")
    start = len(text) - len(text.lstrip(" \t\r\n"))
    if start == len(text):
        raise bad_body("EOF")
    decoder = json.JSONDecoder(parse_float=_number, parse_constant=_refuse_constant)
    try:
        return decoder.raw_decode(text, start)[0]
    except json.JSONDecodeError as exc:
        if exc.pos >= len(text.rstrip(" \t\r\n")):
            raise bad_body("unexpected EOF") from None
        context = _CONTEXT.get(exc.msg, "looking for beginning of value")
        raise bad_body(f"invalid character '{text[exc.pos]}' {context}") from None
    except ValueError as exc:
        raise bad_body(f"invalid character '{str(exc)[0]}' looking for beginning of value"
                       ) from None  # fmt: skip


def _json_kind(value: object) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _type_error(value: object, where: str, go_type: str, with_number: bool = False) -> str:
    kind = _json_kind(value)
    if with_number and kind == "number":
        kind = f"number {getattr(value, 'text', str(value))}"
    return f"json: cannot unmarshal {kind} into Go {where} of type {go_type}"


def _convert(value: object, go_type: str, where: str) -> tuple[object, str | None]:
    """One JSON value into a Go field: (value, None) or (None, the error Go would give)."""
    if go_type in ("string", "bool"):
        fits = isinstance(value, str if go_type == "string" else bool)
        return (value, None) if fits else (None, _type_error(value, where, go_type))
    if go_type.startswith("struct "):  # a Go struct: any object decodes, its fields unused
        fits = isinstance(value, dict)
        return (value, None) if fits else (None, _type_error(value, where, go_type[7:]))
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None, _type_error(value, where, go_type)
    if go_type == "float32":
        if abs(value) <= FLOAT32_MAX:
            return float32(float(value)), None
        return None, _type_error(value, where, go_type, with_number=True)
    if isinstance(value, float) or not INT64_MIN <= value <= INT64_MAX:
        return None, _type_error(value, where, go_type, with_number=True)
    return value, None


def fields(body: object, struct_name: str, go_type: str, schema: Mapping[str, str],
           prefix: str = "") -> tuple[dict[str, Any], str | None]:  # fmt: skip
    """The fields of a Go struct decoded from ``body``: (values given and not null, first
    error). Like Go, a bad field does not stop the others from being decoded."""
    if body is None:
        return {}, None
    if not isinstance(body, dict):
        where = f"struct field {struct_name}.{prefix[:-1]}" if prefix else "value"
        return {}, _type_error(body, where, go_type)
    values: dict[str, Any] = {}
    error: str | None = None
    for key, value in body.items():
        name = key if key in schema else next(
            (f for f in schema if f.lower() == key.lower()), None)  # fmt: skip
        if name is None or value is None:
            continue
        converted, problem = _convert(value, schema[name],
                                      f"struct field {struct_name}.{prefix}{name}")  # fmt: skip
        if problem is None:
            values[name] = converted
        elif error is None:
            error = problem
    return values, error


# Proxy's exported fields (proxy.go), including its untagged zerolog Logger.
PROXY_FIELDS = {"name": "string", "listen": "string", "upstream": "string", "enabled": "bool",
                "Logger": "struct zerolog.Logger"}  # fmt: skip


def proxy_spec(body: object, struct_name: str = "Proxy", go_type: str = "toxiproxy.Proxy",
               position: str = "") -> ProxySpec:  # fmt: skip
    """A new proxy (POST /proxies): name and upstream required, listen and upstream taken as
    given (Go's net package judges them when it listens or dials)."""
    values, error = fields(body, struct_name, go_type, PROXY_FIELDS)
    if error is not None:
        raise bad_body(error)
    if not values.get("name"):
        raise missing(f"name{position}")
    if not values.get("upstream"):
        raise missing(f"upstream{position}")
    return ProxySpec(values["name"], values.get("listen", ""), values["upstream"],
                     values.get("enabled", True))  # fmt: skip


def populate_specs(body: object) -> list[ProxySpec]:
    """POST /populate: every entry checked before any proxy is touched."""
    if body is None:
        return []
    if not isinstance(body, list):
        raise bad_body(_type_error(body, "value", f"[]{POPULATE_ITEM}"))
    decoded = []
    for item in body:
        values, error = fields(item, "", POPULATE_ITEM, PROXY_FIELDS)
        if error is not None:
            raise bad_body(error)
        decoded.append(values)
    specs = []
    for i, values in enumerate(decoded, start=1):
        if not values.get("name"):
            raise missing(f"name at proxy {i}")
        if not values.get("upstream"):
            raise missing(f"upstream at proxy {i}")
        specs.append(ProxySpec(values["name"], values.get("listen", ""), values["upstream"],
                               values.get("enabled", True)))  # fmt: skip
    return specs


def proxy_update(current: ProxySpec, body: object) -> ProxySpec:
    """POST/PATCH /proxies/{name}: given fields replace the current ones; the name stays."""
    values, error = fields(body, "Proxy", "toxiproxy.Proxy", PROXY_FIELDS)
    if error is not None:
        raise bad_body(error)
    return ProxySpec(current.name, values.get("listen", current.listen),
                     values.get("upstream", current.upstream),
                     values.get("enabled", current.enabled))  # fmt: skip


TOXIC_FIELDS = {"attributes": "attributes", "name": "string", "type": "string",
                "stream": "string", "toxicity": "float32"}  # fmt: skip


def _attribute_values(kind: str, raw: object, where: str) -> tuple[dict[str, int], str | None]:
    schema = dict.fromkeys(TOXIC_TYPES[kind], _INT_TYPES.get(kind, "int64"))
    return fields(raw, _STRUCTS[kind], f"toxics.{_STRUCTS[kind]}", schema, f"{where}.")


def new_toxic(body: object, exists: Any) -> Toxic:
    """POST /proxies/{p}/toxics, checked in toxic_collection.go's AddToxicJson order: body,
    stream, type, name taken (``exists(name)``), attributes."""
    plain = {k: v for k, v in body.items() if k.lower() != "attributes"} if isinstance(
        body, dict) else body  # fmt: skip
    schema = {k: v for k, v in TOXIC_FIELDS.items() if k != "attributes"}
    values, error = fields(plain, "ToxicWrapper", "toxics.ToxicWrapper", schema)
    raw_attributes = _field(body, "attributes")
    if error is None and raw_attributes is not None and not isinstance(raw_attributes, dict):
        error = _type_error(raw_attributes, "struct field ToxicWrapper.attributes",
                            "toxics.NoopToxic")  # fmt: skip
    if error is not None:
        raise bad_body(error)
    stream = values.get("stream", "downstream")
    if stream.lower() not in STREAMS:
        raise INVALID_STREAM
    kind = values.get("type", "")
    name = values.get("name") or f"{kind}_{stream}"
    if kind not in TOXIC_TYPES:
        raise INVALID_TOXIC_TYPE
    if exists(name):
        raise TOXIC_EXISTS
    attributes, error = _attribute_values(kind, raw_attributes, "attributes")
    if error is not None:
        raise bad_body(error)
    return Toxic(name, kind, stream.lower(), values.get("toxicity", 1.0),
                 attributes, stream_given=stream)  # fmt: skip


def _field(body: object, name: str) -> object:
    if not isinstance(body, dict):
        return None
    if name in body:
        return body[name]
    return next((v for k, v in body.items() if k.lower() == name), None)


def updated_toxic(toxic: Toxic, body: object) -> Toxic:
    """POST/PATCH /proxies/{p}/toxics/{t}: attributes merge, toxicity replaces; name, type and
    stream stay (toxic_collection.go UpdateToxicJson)."""
    if body is not None and not isinstance(body, dict):
        raise bad_body(_type_error(body, "value", "struct { Attributes interface {} "
                                   '"json:\\"attributes\\""; Toxicity float32 '
                                   '"json:\\"toxicity\\"" }'))  # fmt: skip
    attributes, error = _attribute_values(toxic.type, _field(body, "attributes"), "attributes")
    values, toxicity_error = fields({k: v for k, v in (body or {}).items()
                                     if k.lower() == "toxicity"}, "", "", {"toxicity": "float32"})
    if error is not None or toxicity_error is not None:
        raise bad_body(error or toxicity_error or "")
    return dataclasses.replace(
        toxic,
        toxicity=values.get("toxicity", toxic.toxicity),
        attributes={**toxic.attributes, **attributes},
        version=toxic.version + 1,
    )

