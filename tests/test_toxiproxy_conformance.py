"""The fault proxy's HTTP API against Toxiproxy 2.12.0's answers, byte for byte.

Each case is one request and what Toxiproxy's own source says it answers (api.go,
proxy_collection.go, toxic_collection.go, toxics/*.go, api_test.go at tag v2.12.0): status,
content type and body. Requests run in order against one in-process collection, so later cases
see what earlier ones created. Bodies containing a bound port are compared with the port as "P".
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import trio

from chaos.proxy import api
from chaos.proxy.core import Collection

JSON, TEXT, VERSION_TYPE = "application/json", "text/plain; charset=utf-8", \
    "application/json;charset=utf-8"  # fmt: skip
NOSNIFF = ("X-Content-Type-Options", "nosniff")
UP = "db.example:5432"


def _err(message: str, status: int) -> tuple[int, str, bytes]:
    return status, TEXT, json.dumps({"error": message, "status": status},
                                     separators=(",", ":")).encode() + b"\n"  # fmt: skip


def _proxy(name: str, toxics: str = "[]", enabled: str = "true") -> str:
    return (f'{{"name":"{name}","listen":"127.0.0.1:P","upstream":"{UP}","enabled":{enabled},'
            f'"Logger":{{}},"toxics":{toxics}}}')  # fmt: skip


LAT_UP = ('{"attributes":{"latency":-3,"jitter":0},"name":"latency_UPSTREAM","type":"latency",'
          '"stream":"UPSTREAM","toxicity":0.1}')  # fmt: skip
NOOP = '{"attributes":{},"name":"noop_downstream","type":"noop","stream":"downstream","toxicity":1}'
POPULATE_TYPE = '[]struct { toxiproxy.Proxy; Enabled *bool \\"json:\\\\\\"enabled\\\\\\"\\" }'

Body = bytes | Any
CASES: list[tuple[str, str, Body, int, str | None, bytes]] = [
    ("GET", "/proxies", b"", 200, JSON, b"{}"),
    ("GET", "/version", b"", 200, VERSION_TYPE, b'{"version": "2.12.0"}\n'),
    ("POST", "/proxies", {"name": "a", "upstream": UP, "listen": "localhost:0"}, 201, JSON,
     _proxy("a").encode()),
    ("POST", "/proxies", {"name": "a", "upstream": UP}, *_err("proxy already exists", 409)),
    ("POST", "/proxies", {"upstream": UP}, *_err("missing required field: name", 400)),
    ("POST", "/proxies", {"name": "x"}, *_err("missing required field: upstream", 400)),
    ("POST", "/proxies", {"name": "x", "upstream": None},
     *_err("missing required field: upstream", 400)),
    ("POST", "/proxies", b"", *_err("bad request body: EOF", 400)),
    ("POST", "/proxies", b'{"name":', *_err("bad request body: unexpected EOF", 400)),
    ("POST", "/proxies", b"{not json", *_err(
        "bad request body: invalid character 'n' looking for beginning of object key string", 400)),
    ("POST", "/proxies", {"name": 5, "upstream": UP}, *_err(
        "bad request body: json: cannot unmarshal number into Go struct field Proxy.name "
        "of type string", 400)),
    ("POST", "/proxies", {"name": "x", "upstream": UP, "enabled": "yes"}, *_err(
        "bad request body: json: cannot unmarshal string into Go struct field Proxy.enabled "
        "of type bool", 400)),
    ("POST", "/proxies", {"name": "x", "upstream": UP, "Logger": 1}, *_err(
        "bad request body: json: cannot unmarshal number into Go struct field Proxy.Logger "
        "of type zerolog.Logger", 400)),
    ("POST", "/proxies", [1], *_err(
        "bad request body: json: cannot unmarshal array into Go value of type "
        "toxiproxy.Proxy", 400)),
    ("POST", "/proxies", {"name": "x", "upstream": UP, "listen": "local373"}, *_err(
        "listen tcp: address local373: missing port in address", 500)),
    ("POST", "/proxies", {"name": "off", "upstream": UP, "listen": "localhost:0", "enabled": False},
     201, JSON, _proxy("off", enabled="false").replace("127.0.0.1:P", "localhost:0").encode()),
    ("POST", "/proxies/off", {"listen": "nowhere"}, *_err(
        "address nowhere: missing port in address", 500)),
    ("POST", "/proxies/off", {"enabled": True}, 200, JSON, _proxy("off").encode()),
    ("DELETE", "/proxies/off", b"", 204, None, b""),
    ("GET", "/proxies/nope", b"", *_err("proxy not found", 404)),
    ("DELETE", "/proxies/nope", b"", *_err("proxy not found", 404)),
    ("POST", "/proxies/a/toxics", {"type": "noop"}, 200, JSON, NOOP.encode()),
    ("POST", "/proxies/a/toxics", {"type": "noop"}, *_err("toxic already exists", 409)),
    ("POST", "/proxies/a/toxics", {"type": "latency", "stream": "UPSTREAM", "toxicity": 0.1,
                                   "attributes": {"latency": -3}}, 200, JSON, LAT_UP.encode()),
    ("POST", "/proxies/a/toxics", {"type": "gremlins"}, *_err("invalid toxic type", 400)),
    ("POST", "/proxies/a/toxics", {"type": "latency", "stream": "sideways"}, *_err(
        "stream was invalid, can be either upstream or downstream", 400)),
    ("POST", "/proxies/a/toxics", {"type": "latency", "attributes": {"latency": 1.5}}, *_err(
        "bad request body: json: cannot unmarshal number 1.5 into Go struct field "
        "LatencyToxic.attributes.latency of type int64", 400)),
    ("POST", "/proxies/a/toxics", {"type": "latency", "toxicity": "x"}, *_err(
        "bad request body: json: cannot unmarshal string into Go struct field "
        "ToxicWrapper.toxicity of type float32", 400)),
    ("POST", "/proxies/nope/toxics", {"type": "latency"}, *_err("proxy not found", 404)),
    ("GET", "/proxies/a/toxics", b"", 200, JSON, f"[{LAT_UP},{NOOP}]".encode()),
    ("PATCH", "/proxies/a/toxics/latency_UPSTREAM", {"attributes": {"jitter": 4}, "toxicity": 7},
     200, JSON, LAT_UP.replace('"jitter":0', '"jitter":4').replace("0.1}", "7}").encode()),
    ("GET", "/proxies/a/toxics/nope", b"", *_err("toxic not found", 404)),
    ("POST", "/proxies/a/toxics/nope", {}, *_err("toxic not found", 404)),
    ("DELETE", "/proxies/a/toxics/nope", b"", *_err("toxic not found", 404)),
    ("DELETE", "/proxies/a/toxics/noop_downstream", b"", 204, None, b""),
    ("POST", "/proxies/a", {"enabled": False}, 200, JSON, _proxy("a", LAT_UP.replace(
        '"jitter":0', '"jitter":4').replace("0.1}", "7}").join("[]"), "false").encode()),
    ("POST", "/reset", b"", 204, None, b""),
    ("PATCH", "/proxies/a", b"", *_err("bad request body: EOF", 400)),
    ("PATCH", "/proxies/a/toxics/x", b"", *_err("toxic not found", 404)),
    ("POST", "/proxies/a", {"NAME": "renamed", "Enabled": True, "Logger": {}, "x": [1]}, 200, JSON,
     _proxy("a").encode()),
    ("GET", "/proxies/a", b"", 200, JSON, _proxy("a").encode()),
    ("POST", "/populate", {"x": 1}, 400, JSON, (
        '{"error":"bad request body: json: cannot unmarshal object into Go value of type '
        f'{POPULATE_TYPE}","status":400,"proxies":null}}').encode()),
    ("POST", "/populate", [{"name": "b", "upstream": UP}, {"upstream": UP}], 400, JSON,
     b'{"error":"missing required field: name at proxy 2","status":400,"proxies":null}'),
    ("POST", "/populate", [], 201, JSON, b'{"proxies":null}'),
    ("POST", "/populate", [{"name": "b", "upstream": UP, "listen": "127.0.0.1:0"}], 201, JSON,
     f'{{"proxies":[{_proxy("b")}]}}'.encode()),
    ("GET", "/proxies", b"", 200, JSON, f'{{"a":{_proxy("a")},"b":{_proxy("b")}}}'.encode()),
    ("DELETE", "/proxies/b", b"", 204, None, b""),
    ("GET", "/nothing/here", b"", 404, TEXT, b"404 page not found\n"),
    ("GET", "/proxies/", b"", 404, TEXT, b"404 page not found\n"),
    ("PUT", "/proxies/a", b"", 405, None, b""),
    ("GET", "/populate", b"", 405, None, b""),
]  # fmt: skip


async def _ask(collection: Collection, method: str, path: str, body: Body,
               user_agent: str = "curl/8") -> api.Answer:  # fmt: skip
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return await api.dispatch(collection, method, path, user_agent, raw)


@pytest.mark.trio
async def test_every_case_answers_as_toxiproxy() -> None:
    async with trio.open_nursery() as nursery:
        collection = Collection(nursery)
        for method, path, body, status, content_type, expected in CASES:
            answer = await _ask(collection, method, path, body)
            got = re.sub(rb"127\.0\.0\.1:\d+", b"127.0.0.1:P", answer.body)
            case = (method, path, body)
            assert (answer.status, answer.content_type, got) == (status, content_type, expected), (
                case
            )
            if content_type == TEXT:
                assert NOSNIFF in answer.headers, case
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_request_id_browser_refusal_and_taken_address() -> None:
    async with trio.open_nursery() as nursery:
        collection = Collection(nursery)
        created = await _ask(collection, "POST", "/proxies", {"name": "a", "upstream": UP})
        listen = json.loads(created.body)["listen"]
        ids = dict(created.headers).get("X-Toxiproxy-Request-Id", "")
        assert re.fullmatch(r"[0-9a-v]{20}", ids)
        browser = await _ask(collection, "GET", "/proxies", b"", "Mozilla/5.0 (X11)")
        assert (browser.status, browser.content_type, browser.body) == (
            403,
            TEXT,
            b"User agent not allowed\n",
        )
        unrouted = await _ask(collection, "GET", "/x", b"", "Mozilla/5.0")  # mux: no middleware
        assert unrouted.status == 404 and "X-Toxiproxy-Request-Id" not in dict(unrouted.headers)
        taken = await _ask(collection, "POST", "/proxies", {"name": "b", "upstream": UP,
                                                            "listen": listen})  # fmt: skip
        assert (taken.status, taken.body) == _err(
            f"listen tcp {listen}: bind: address already in use", 500
        )[::2]
        # Populate replaces a proxy only when the resolved listen or the upstream differ.
        same = await _ask(
            collection,
            "POST",
            "/populate",
            [{"name": "a", "upstream": UP, "listen": listen, "enabled": False}],
        )
        assert json.loads(same.body)["proxies"][0]["enabled"] is True
        nursery.cancel_scope.cancel()
