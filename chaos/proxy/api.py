"""The fault proxy's HTTP API: Toxiproxy's v2 paths, bodies and status codes, on trio + h11.

    GET    /proxies                      every proxy, by name
    POST   /proxies                      create one (201)
    POST   /populate                     create or replace many (201, {"proxies": [...]})
    GET    /proxies/{proxy}              one
    POST   /proxies/{proxy}              update listen, upstream, enabled (PATCH too)
    DELETE /proxies/{proxy}              remove (204)
    GET    /proxies/{proxy}/toxics       its toxics
    POST   /proxies/{proxy}/toxics       add one (200)
    GET    /proxies/{proxy}/toxics/{t}   one
    POST   /proxies/{proxy}/toxics/{t}   update attributes, toxicity (PATCH too)
    DELETE /proxies/{proxy}/toxics/{t}   remove (204)
    POST   /reset                        every proxy enabled, every toxic removed (204)
    GET    /version                      {"version": ...}
    GET    /metrics                      Prometheus text (ours; Toxiproxy's has other names)

Like Toxiproxy, requests that look like a browser's (User-Agent "Mozilla/...") are refused with
403, so that a web page cannot drive the proxy through the user's browser.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote

import h11
import trio

from chaos.proxy import model
from chaos.proxy.core import Collection

VERSION = "kizo-fault-proxy 2.12.0-compatible"
BODY_MAX = 1024 * 1024
READ_TIMEOUT_S = 10.0
IDLE_TIMEOUT_S = 60.0

Reply = tuple[int, Any]  # status, JSON body (None: no body)
Handler = Callable[[Collection, dict[str, str], Any], Awaitable[Reply]]


def _json_body(raw: bytes) -> Any:
    try:
        return json.loads(raw.decode()) if raw.strip() else None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise model.bad_body(str(exc)) from None


async def _index(c: Collection, _p: dict[str, str], _b: Any) -> Reply:
    return 200, {name: proxy.as_json() for name, proxy in c.proxies.items()}


async def _create(c: Collection, _p: dict[str, str], body: Any) -> Reply:
    return 201, (await c.add(model.proxy_spec(body))).as_json()


async def _populate(c: Collection, _p: dict[str, str], body: Any) -> Reply:
    if not isinstance(body, list):
        raise model.bad_body("expected a JSON array of proxies")
    specs = [model.proxy_spec(item) for item in body]  # all valid before any is created
    return 201, {"proxies": [(await c.add_or_replace(spec)).as_json() for spec in specs]}


async def _show(c: Collection, p: dict[str, str], _b: Any) -> Reply:
    return 200, c.get(p["proxy"]).as_json()


async def _update(c: Collection, p: dict[str, str], body: Any) -> Reply:
    proxy = c.get(p["proxy"])
    await c.update(proxy, model.proxy_update(proxy.spec, body))
    return 200, proxy.as_json()


async def _delete(c: Collection, p: dict[str, str], _b: Any) -> Reply:
    await c.remove(p["proxy"])
    return 204, None


async def _toxics(c: Collection, p: dict[str, str], _b: Any) -> Reply:
    return 200, [t.as_json() for t in c.get(p["proxy"]).toxics]


async def _toxic_create(c: Collection, p: dict[str, str], body: Any) -> Reply:
    proxy = c.get(p["proxy"])
    toxic = model.new_toxic(body)
    proxy.add_toxic(toxic)
    return 200, toxic.as_json()


async def _toxic_show(c: Collection, p: dict[str, str], _b: Any) -> Reply:
    return 200, c.get(p["proxy"]).toxic(p["toxic"]).as_json()


async def _toxic_update(c: Collection, p: dict[str, str], body: Any) -> Reply:
    proxy = c.get(p["proxy"])
    toxic = model.updated_toxic(proxy.toxic(p["toxic"]), body)
    proxy.replace_toxic(toxic)
    return 200, toxic.as_json()


async def _toxic_delete(c: Collection, p: dict[str, str], _b: Any) -> Reply:
    c.get(p["proxy"]).remove_toxic(p["toxic"])
    return 204, None


async def _reset(c: Collection, _p: dict[str, str], _b: Any) -> Reply:
    await c.reset()
    return 204, None


async def _version(_c: Collection, _p: dict[str, str], _b: Any) -> Reply:
    return 200, {"version": VERSION}


_SEGMENT = r"(?P<{}>[^/]+)"
ROUTES: list[tuple[re.Pattern[str], dict[str, Handler]]] = [
    (re.compile(r"/proxies"), {"GET": _index, "POST": _create}),
    (re.compile(r"/populate"), {"POST": _populate}),
    (re.compile(r"/reset"), {"POST": _reset}),
    (re.compile(r"/version"), {"GET": _version}),
    (
        re.compile(r"/proxies/" + _SEGMENT.format("proxy")),
        {"GET": _show, "POST": _update, "PATCH": _update, "DELETE": _delete},
    ),
    (
        re.compile(r"/proxies/" + _SEGMENT.format("proxy") + "/toxics"),
        {"GET": _toxics, "POST": _toxic_create},
    ),
    (
        re.compile(r"/proxies/" + _SEGMENT.format("proxy") + "/toxics/" + _SEGMENT.format("toxic")),
        {
            "GET": _toxic_show,
            "POST": _toxic_update,
            "PATCH": _toxic_update,
            "DELETE": _toxic_delete,
        },
    ),
]


async def dispatch(collection: Collection, method: str, target: str, user_agent: str,
                   raw_body: bytes) -> Reply:  # fmt: skip
    """One request -> (status, JSON body or None). Never raises for bad input."""
    if user_agent.startswith("Mozilla/"):
        return 403, {"error": "requests from browsers are not allowed", "status": 403}
    path = target.split("?", 1)[0]
    for pattern, methods in ROUTES:
        match = pattern.fullmatch(path)
        if match is None:
            continue
        handler = methods.get(method)
        if handler is None:
            return 405, {"error": "method not allowed", "status": 405}
        params = {k: unquote(v) for k, v in match.groupdict().items()}
        try:
            return await handler(collection, params, _json_body(raw_body))
        except model.ApiError as exc:
            return exc.status, exc.as_json()
        except Exception as exc:  # a bug: answered, logged, and the server stays up
            print(f"kizo proxy: {method} {path} failed: {exc!r}", file=sys.stderr)
            return 500, {"error": "internal error", "status": 500}
    return 404, {"error": "not found", "status": 404}


MetricsText = Callable[[], bytes]


async def serve_connection(stream: trio.SocketStream, collection: Collection,
                           metrics: MetricsText) -> None:  # fmt: skip
    """HTTP/1.1 with keep-alive; each request bounded in size and time."""
    conn = h11.Connection(h11.SERVER)
    try:
        while True:
            request, body = await _read_request(stream, conn)
            if request is None:
                return
            headers = {k.decode().lower(): v.decode("latin-1") for k, v in request.headers}
            method, target = request.method.decode(), request.target.decode("latin-1")
            if method == "GET" and target.split("?", 1)[0] == "/metrics":
                await _send(stream, conn, 200, metrics(), "text/plain; version=0.0.4")
            else:
                status, payload = await dispatch(collection, method, target,
                                                 headers.get("user-agent", ""), body)  # fmt: skip
                data = b"" if payload is None else json.dumps(payload).encode() + b"\n"
                await _send(stream, conn, status, data, "application/json")
            if conn.our_state is h11.MUST_CLOSE:
                return
            conn.start_next_cycle()
    except (h11.RemoteProtocolError, trio.BrokenResourceError, trio.TooSlowError):
        return
    finally:
        await stream.aclose()


async def _read_request(stream: trio.SocketStream, conn: h11.Connection
                        ) -> tuple[h11.Request | None, bytes]:  # fmt: skip
    request: h11.Request | None = None
    body = bytearray()
    timeout = IDLE_TIMEOUT_S
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            with trio.fail_after(timeout):
                conn.receive_data(await stream.receive_some(65536))
            continue
        if isinstance(event, h11.Request):
            request, timeout = event, READ_TIMEOUT_S
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > BODY_MAX:
                raise h11.RemoteProtocolError("body too large")
        elif isinstance(event, h11.EndOfMessage):
            return request, bytes(body)
        elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
            return None, b""


async def _send(stream: trio.SocketStream, conn: h11.Connection, status: int, data: bytes,
                content_type: str) -> None:  # fmt: skip
    headers = [] if status == 204 else [("Content-Length", str(len(data)))]
    if data:
        headers.append(("Content-Type", content_type))
    await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers)) or b"")
    if data:
        await stream.send_all(conn.send(h11.Data(data=data)) or b"")
    await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
