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
    GET    /metrics                      Prometheus text: Toxiproxy's proxy metrics, and ours

Every answer is Toxiproxy 2.12.0's, bytes included (api.go): compact JSON without a newline and
"application/json"; errors are {"error", "status"} + newline as "text/plain; charset=utf-8"
(Go's http.Error); a path no route has is Go's "404 page not found", a method a route lacks a
bare 405; matched routes carry X-Toxiproxy-Request-Id; like Toxiproxy, requests that look like a
browser's (User-Agent "Mozilla/...") are refused with 403 "User agent not allowed".
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any
from urllib.parse import unquote

import h11
import structlog
import trio

from chaos.proxy import model
from chaos.proxy.core import Collection, Proxy

log = structlog.get_logger("kizo.proxy")

VERSION = "2.12.0"  # the Toxiproxy release whose API this one answers as
BODY_MAX = 1024 * 1024
READ_TIMEOUT_S = 10.0
IDLE_TIMEOUT_S = 60.0
TEXT = "text/plain; charset=utf-8"
# What Toxiproxy's /metrics (Go's promhttp, text format) answers a scraper with.
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass
class Answer:
    status: int
    body: bytes = b""
    content_type: str | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)


Handler = Callable[[Collection, dict[str, str], bytes], Awaitable[Answer]]


def go_json(value: Any) -> bytes:
    """What Go's json.Marshal writes: compact, UTF-8, <, >, & and U+2028/9 escaped."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    for char, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                          ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):  # fmt: skip
        text = text.replace(char, escaped)
    return text.encode()


def ok(value: Any, status: int = 200) -> Answer:
    return Answer(status, go_json(value), "application/json")


def error(exc: model.ApiError) -> Answer:
    """Go's http.Error with the ApiError's JSON, as api.go's apiError sends it."""
    return Answer(exc.status, go_json(exc.as_json()) + b"\n", TEXT,
                  [("X-Content-Type-Options", "nosniff")])  # fmt: skip


def toxics_json(proxy: Proxy) -> list[dict[str, Any]]:
    """Upstream toxics first, then downstream, each in the order added (Toxiproxy's chains)."""
    ordered = sorted(proxy.toxics, key=lambda t: model.STREAMS.index(t.stream))
    return [t.as_json() for t in ordered]


def proxy_json(proxy: Proxy) -> dict[str, Any]:
    """Go's proxyToxics: Proxy's exported fields in order, its untagged Logger pointer (a
    zerolog.Logger, all unexported fields) as {}, then toxics."""
    return {"name": proxy.spec.name, "listen": proxy.spec.listen,
            "upstream": proxy.spec.upstream, "enabled": proxy.enabled, "Logger": {},
            "toxics": toxics_json(proxy)}  # fmt: skip


def resolved_listen(spec: model.ProxySpec) -> model.ProxySpec:
    """Toxiproxy's listen is what Go resolves; an empty one is any free port (here on
    127.0.0.1: this harness never listens beyond loopback unless told)."""
    listen = model.go_listen(spec.listen or "127.0.0.1:0")
    return model.ProxySpec(spec.name, listen, spec.upstream, spec.enabled)


def _bind_error(exc: model.ApiError, listen: str) -> model.ApiError:
    """The core's refusal to bind, as Go's net.Listen error: 500 (proxy.go listen)."""
    reason = exc.message.rsplit(": ", 1)[-1]
    return model.ApiError(500, f"listen tcp {listen}: bind: {reason[:1].lower()}{reason[1:]}")


async def _start(proxy: Proxy) -> None:
    """Go resolves the listen address only when it listens: a disabled proxy shows it as
    given ("localhost:0", even "")."""
    if not proxy.enabled:
        proxy.spec = resolved_listen(proxy.spec)
    try:
        await proxy.start()
    except model.ApiError as exc:
        raise _bind_error(exc, proxy.spec.listen) from None


async def _add(c: Collection, spec: model.ProxySpec) -> Proxy:
    """proxy_collection.go Add: the name is checked before the address is bound."""
    if spec.name in c.proxies:
        raise model.PROXY_EXISTS
    if spec.enabled:
        spec = resolved_listen(spec)
    try:
        return await c.add(spec)
    except model.ApiError as exc:
        raise _bind_error(exc, spec.listen) from None


async def _index(c: Collection, _p: dict[str, str], _b: bytes) -> Answer:
    return ok({name: proxy_json(c.proxies[name]) for name in sorted(c.proxies)})


async def _create(c: Collection, _p: dict[str, str], raw: bytes) -> Answer:
    return ok(proxy_json(await _add(c, model.proxy_spec(model.load(raw)))), 201)


async def _populate(c: Collection, _p: dict[str, str], raw: bytes) -> Answer:
    """Populate answers application/json even on error, with the proxies done so far (null
    when none)."""
    done: list[dict[str, Any]] = []
    problem: model.ApiError | None = None
    try:
        for spec in model.populate_specs(model.load(raw)):
            done.append(proxy_json(await _add_or_replace(c, spec)))
    except model.ApiError as exc:
        problem = exc
    body: dict[str, Any] = {} if problem is None else problem.as_json()
    body["proxies"] = done or None
    return ok(body, 201 if problem is None else problem.status)


def _differs(proxy: Proxy, spec: model.ProxySpec) -> bool:
    """proxy.go Differs: the resolved listen or the upstream changed (not enabled)."""
    return proxy.spec.listen != model.go_listen(spec.listen, op="") or \
        proxy.spec.upstream != spec.upstream  # fmt: skip


async def _add_or_replace(c: Collection, spec: model.ProxySpec) -> Proxy:
    existing = c.proxies.get(spec.name)
    if existing is not None:
        if not _differs(existing, spec):
            return existing
        existing.stop()
        await existing.stopped()
        del c.proxies[spec.name]
        try:
            return await _add(c, spec)
        except model.ApiError:
            c.proxies[spec.name] = existing  # Toxiproxy keeps the old one, stopped
            raise
    return await _add(c, spec)


async def _show(c: Collection, p: dict[str, str], _b: bytes) -> Answer:
    return ok(proxy_json(c.get(p["proxy"])))


async def _update(c: Collection, p: dict[str, str], raw: bytes) -> Answer:
    """proxy.go Update: a changed address restarts the proxy there; enabled then applies."""
    proxy = c.get(p["proxy"])
    spec = model.proxy_update(proxy.spec, model.load(raw))
    if _differs(proxy, spec):
        proxy.stop()
        await proxy.stopped()
        proxy.spec = model.ProxySpec(spec.name, spec.listen, spec.upstream, proxy.enabled)
    if spec.enabled and not proxy.enabled:
        await _start(proxy)
    elif not spec.enabled and proxy.enabled:
        proxy.stop()
        await proxy.stopped()
    return ok(proxy_json(proxy))


async def _delete(c: Collection, p: dict[str, str], _b: bytes) -> Answer:
    await c.remove(p["proxy"])
    return Answer(204)


async def _toxics(c: Collection, p: dict[str, str], _b: bytes) -> Answer:
    return ok(toxics_json(c.get(p["proxy"])))


def _has(proxy: Proxy, name: str) -> bool:
    return any(t.name == name for t in proxy.toxics)


async def _toxic_create(c: Collection, p: dict[str, str], raw: bytes) -> Answer:
    proxy = c.get(p["proxy"])
    toxic = model.new_toxic(model.load(raw), lambda name: _has(proxy, name))
    proxy.add_toxic(toxic)
    return ok(toxic.as_json())


async def _toxic_show(c: Collection, p: dict[str, str], _b: bytes) -> Answer:
    return ok(c.get(p["proxy"]).toxic(p["toxic"]).as_json())


async def _toxic_update(c: Collection, p: dict[str, str], raw: bytes) -> Answer:
    proxy = c.get(p["proxy"])
    current = proxy.toxic(p["toxic"])
    toxic = model.updated_toxic(current, model.load(raw))
    proxy.replace_toxic(toxic)
    return ok(toxic.as_json())


async def _toxic_delete(c: Collection, p: dict[str, str], _b: bytes) -> Answer:
    c.get(p["proxy"]).remove_toxic(p["toxic"])
    return Answer(204)


async def _reset(c: Collection, _p: dict[str, str], _b: bytes) -> Answer:
    """api.go ResetState: each proxy started (a failure answers at once), toxics cleared."""
    for proxy in c.proxies.values():
        await _start(proxy)
        proxy.clear_toxics()
    return Answer(204)


async def _version(_c: Collection, _p: dict[str, str], _b: bytes) -> Answer:
    body = f'{{"version": "{VERSION}"}}\n'.encode()  # api.go writes it by hand, spaced
    return Answer(200, body, "application/json;charset=utf-8")


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
_XID = "0123456789abcdefghijklmnopqrstuv"


def request_id() -> str:
    """20 characters in the alphabet of the xid Toxiproxy's hlog middleware sends."""
    return "".join(_XID[b % 32] for b in os.urandom(20))


async def dispatch(collection: Collection, method: str, target: str, user_agent: str,
                   raw_body: bytes) -> Answer:  # fmt: skip
    """One request -> its answer. Never raises for bad input. Like gorilla/mux, the path is
    matched decoded, and the middlewares (request id, browser check) run on matched routes
    only."""
    path = unquote(target.split("?", 1)[0])
    for pattern, methods in ROUTES:
        match = pattern.fullmatch(path)
        if match is None:
            continue
        handler = methods.get(method)
        if handler is None:
            return Answer(405)
        answer = await _run(handler, collection, match.groupdict(), user_agent, raw_body)
        answer.headers.append(("X-Toxiproxy-Request-Id", request_id()))
        return answer
    return Answer(404, b"404 page not found\n", TEXT, [("X-Content-Type-Options", "nosniff")])


async def _run(handler: Handler, collection: Collection, params: dict[str, str],
               user_agent: str, raw_body: bytes) -> Answer:  # fmt: skip
    if user_agent.startswith("Mozilla/"):
        return Answer(403, b"User agent not allowed\n", TEXT,
                      [("X-Content-Type-Options", "nosniff")])  # fmt: skip
    try:
        return await handler(collection, params, raw_body)
    except model.ApiError as exc:
        return error(exc)
    except Exception as exc:  # a bug: answered, logged, and the server stays up
        log.error("proxy_api_failed", handler=handler.__name__, error=repr(exc))
        return error(model.ApiError(500, "internal error"))


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
                await _send(stream, conn, 200, metrics(), METRICS_CONTENT_TYPE)
            else:
                answer = await dispatch(collection, method, target,
                                        headers.get("user-agent", ""), body)  # fmt: skip
                await _send(stream, conn, answer.status, answer.body, answer.content_type,
                            answer.headers)  # fmt: skip
                if method != "GET":  # a change (a proxy, a toxic, a reset): one event each
                    log.info("proxy_api_request", method=method, path=target.split("?", 1)[0],
                             status=answer.status)  # fmt: skip
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
                content_type: str | None, extra: list[tuple[str, str]] | None = None
                ) -> None:  # fmt: skip
    headers = [] if status == 204 else [("Content-Length", str(len(data)))]
    if content_type is not None:
        headers.append(("Content-Type", content_type))
    headers += [*(extra or []), ("Date", formatdate(usegmt=True))]
    await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers)) or b"")
    if data:
        await stream.send_all(conn.send(h11.Data(data=data)) or b"")
    await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
