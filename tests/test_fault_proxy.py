"""The fault proxy: Toxiproxy's own Python client drives it, its API errors are Toxiproxy's, and
each toxic does to real TCP connections (an echo server, and Valkey) what it says."""

from __future__ import annotations

import functools
import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import httpx
import pytest
import redis
import toxiproxy.api
import toxiproxy.exceptions
import trio
from prometheus_client.parser import text_string_to_metric_families
from toxiproxy.server import Toxiproxy

from chaos.proxy.core import Collection
from chaos.proxy.server import PROXIES_FILE, load_specs, serve
from tests.conftest import ServerSet

MESSAGE = b"kizo says hello"


@dataclass
class Harness:
    collection: Collection
    api: httpx.AsyncClient
    echo_port: int
    api_port: int

    async def proxy(self, name: str = "echo", **toxic: Any) -> int:
        """A proxy to the echo server (with one toxic, if given); returns its port."""
        upstream = f"127.0.0.1:{self.echo_port}"
        body = {"name": name, "listen": "127.0.0.1:0", "upstream": upstream}
        r = await self.api.post("/proxies", json=body)
        assert r.status_code == 201, r.text
        if toxic:
            added = await self.api.post(f"/proxies/{name}/toxics", json=toxic)
            assert added.status_code == 200, added.text
        return int(r.json()["listen"].rsplit(":", 1)[1])


async def _echo(stream: trio.SocketStream) -> None:
    try:
        while data := await stream.receive_some(65536):
            if data == b"close-me":
                await stream.send_all(b"bye")
                return
            await stream.send_all(data)
    except trio.BrokenResourceError:
        pass
    finally:
        await stream.aclose()


@pytest.fixture
async def harness(nursery: trio.Nursery) -> AsyncIterator[Harness]:
    [echo] = await nursery.start(functools.partial(trio.serve_tcp, _echo, 0, host="127.0.0.1"))
    collection, api_port = await nursery.start(serve, "127.0.0.1", 0, [], 7)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api_port}", timeout=10) as api:
        yield Harness(collection, api, echo.socket.getsockname()[1], api_port)
    nursery.cancel_scope.cancel()


async def _connect(port: int) -> trio.SocketStream:
    return await trio.open_tcp_stream("127.0.0.1", port)


async def _echoed(stream: trio.SocketStream, data: bytes) -> tuple[bytes, float]:
    """Send ``data`` on ``stream`` and read its echo back whole; the echo and how long it took."""
    started = trio.current_time()
    await stream.send_all(data)
    got = b""
    with trio.fail_after(10):
        while len(got) < len(data):
            chunk = await stream.receive_some(65536)
            assert chunk, "closed early"
            got += chunk
    return got, trio.current_time() - started


async def _round_trip(port: int, data: bytes = MESSAGE) -> tuple[bytes, float]:
    started = trio.current_time()
    stream = await _connect(port)
    try:
        got, _ = await _echoed(stream, data)
        return got, trio.current_time() - started
    finally:
        await stream.aclose()


@pytest.mark.trio
async def test_toxiproxy_python_client_drives_it(harness: Harness) -> None:
    toxiproxy.api.APIConsumer.host, toxiproxy.api.APIConsumer.port = "127.0.0.1", harness.api_port
    server = Toxiproxy()
    upstream = f"127.0.0.1:{harness.echo_port}"

    def scenario() -> dict[str, Any]:
        seen: dict[str, Any] = {"running": server.running()}
        proxy = server.create(upstream=upstream, name="echo")
        seen["listed"] = sorted(server.proxies())
        proxy.add_toxic(type="latency", attributes={"latency": 150, "jitter": 10})
        proxy.add_toxic(name="cut", type="limit_data", stream="upstream",
                        attributes={"bytes": 4096}, toxicity=0.5)  # fmt: skip
        seen["toxics"] = {n: (t.type, t.stream, t.toxicity, t.attributes)
                          for n, t in proxy.toxics().items()}  # fmt: skip
        with pytest.raises(toxiproxy.exceptions.ProxyExists):
            server.create(upstream=upstream, name="echo")
        proxy.destroy_toxic("cut")
        seen["after_destroy"] = sorted(proxy.toxics())
        with proxy.down():
            seen["down"] = server.get_proxy("echo").enabled
        seen["up"] = server.get_proxy("echo").enabled
        seen["version"] = json.loads(server.version())["version"]
        server.reset()
        seen["after_reset"] = sorted(proxy.toxics())
        seen["listen"] = proxy.listen
        proxy.destroy()
        seen["left"] = server.proxies()
        return seen

    seen = await trio.to_thread.run_sync(scenario)
    assert seen["running"] and seen["listed"] == ["echo"]
    assert seen["toxics"] == {
        "latency_downstream": ("latency", "downstream", 1.0, {"latency": 150, "jitter": 10}),
        "cut": ("limit_data", "upstream", 0.5, {"bytes": 4096}),
    }
    assert seen["after_destroy"] == ["latency_downstream"]
    assert (seen["down"], seen["up"]) == (False, True)
    assert seen["after_reset"] == [] and seen["version"] == "2.12.0"
    assert seen["listen"].startswith("127.0.0.1:") and not seen["listen"].endswith(":0")
    assert seen["left"] == {}


@pytest.mark.trio
async def test_api_errors_are_toxiproxys_and_change_nothing(harness: Harness) -> None:
    api = harness.api
    await harness.proxy()
    before = (await api.get("/proxies")).json()
    cases: list[tuple[str, str, Any, int, str]] = [
        ("GET", "/proxies/nope", None, 404, "proxy not found"),
        ("POST", "/proxies", {"name": "echo", "upstream": "127.0.0.1:1"}, 409, "already exists"),
        ("POST", "/proxies", {"upstream": "127.0.0.1:1"}, 400, "missing required field: name"),
        ("POST", "/proxies", {"name": "x"}, 400, "missing required field: upstream"),
        ("POST", "/proxies", {"name": "x", "upstream": "127.0.0.1:1", "enabled": "yes"}, 400,
         "enabled"),
        ("POST", "/proxies", [1, 2], 400, "bad request body"),
        ("POST", "/proxies/echo/toxics", {"type": "gremlins"}, 400, "invalid toxic type"),
        ("POST", "/proxies/echo/toxics", {"type": "latency", "stream": "sideways"}, 400,
         "stream was invalid"),
        ("POST", "/proxies/echo/toxics", {"type": "latency", "attributes": {"latency": 1.5}},
         400, "cannot unmarshal number 1.5"),
        ("GET", "/proxies/echo/toxics/nope", None, 404, "toxic not found"),
        ("DELETE", "/proxies/echo/toxics/nope", None, 404, "toxic not found"),
        ("POST", "/proxies/nope/toxics", {"type": "latency"}, 404, "proxy not found"),
    ]  # fmt: skip
    for method, path, body, status, message in cases:
        r = await api.request(method, path, json=body)
        assert (r.status_code, r.json()["status"]) == (status, status), (method, path, r.text)
        assert message in r.json()["error"], (method, path, r.text)
    raw = await api.post("/proxies", content=b"{not json", headers={"Content-Type": "x"})
    assert raw.status_code == 400 and "bad request body" in raw.json()["error"]
    browser = await api.post("/reset", headers={"User-Agent": "Mozilla/5.0 (X11)"})
    assert browser.status_code == 403
    duplicate = await api.post("/proxies/echo/toxics", json={"type": "latency"})
    again = await api.post("/proxies/echo/toxics", json={"type": "latency"})
    assert (duplicate.status_code, again.status_code) == (200, 409)
    await api.delete("/proxies/echo/toxics/latency_downstream")
    assert (await api.get("/proxies")).json() == before


@pytest.mark.trio
async def test_a_clean_proxy_passes_bytes_both_ways_and_counts_them(harness: Harness) -> None:
    port = await harness.proxy()
    big = bytes(range(256)) * 1024  # 256 KiB, several chunks
    got, _ = await _round_trip(port, big)
    assert got == big
    metrics = (await harness.api.get("/metrics")).text
    assert 'kizo_proxy_connections_total{proxy="echo"} 1.0' in metrics
    assert f'kizo_proxy_bytes_total{{proxy="echo",stream="upstream"}} {float(len(big))}' in metrics


TOXIPROXY_METRICS = ("toxiproxy_proxy_received_bytes", "toxiproxy_proxy_sent_bytes")
METRICS_SETTLE_S = 5.0  # a relay thread counts a write just after the peer may have read it


def _toxiproxy_counts(text: str) -> dict[tuple[str, str, tuple[tuple[str, str], ...]], float]:
    """(metric, direction, the other labels) -> value, of Toxiproxy's byte counters."""
    counts = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if family.name in TOXIPROXY_METRICS and sample.name.endswith("_total"):
                labels = dict(sample.labels)
                counts[(family.name, labels.pop("direction"), tuple(sorted(labels.items())))] = (
                    sample.value
                )
    return counts


async def _settled_counts(
    harness: Harness, want: dict[str, float]
) -> tuple[dict[str, float], set[tuple[tuple[str, str], ...]]]:
    """Toxiproxy's byte counters (metric/direction -> bytes) once those in ``want`` match it
    (bounded: then as they are), and the label sets they carry besides the direction."""
    deadline = trio.current_time() + METRICS_SETTLE_S
    while True:
        answer = await harness.api.get("/metrics")
        assert answer.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
        counts = _toxiproxy_counts(answer.text)
        got = {f"{name}/{direction}": value for (name, direction, _), value in counts.items()}
        settled = all(got.get(key) == value for key, value in want.items())
        if settled or trio.current_time() > deadline:
            return got, {labels for _, _, labels in counts}
        await trio.sleep(0.05)


def _series(port: int, harness: Harness) -> tuple[tuple[str, str], ...]:
    return (("listener", f"127.0.0.1:{port}"), ("proxy", "echo"),
            ("upstream", f"127.0.0.1:{harness.echo_port}"))  # fmt: skip


@pytest.mark.trio
async def test_toxiproxys_byte_counters_count_each_direction_exactly(harness: Harness) -> None:
    port = await harness.proxy()
    big = bytes(range(256)) * 1024  # 256 KiB: several chunks, through the relay threads
    small = b"and a few more"
    assert (await _round_trip(port, big))[0] == big
    assert (await _round_trip(port, small))[0] == small
    both = float(len(big) + len(small))
    want = {f"{m}/{d}": both for m in TOXIPROXY_METRICS for d in ("upstream", "downstream")}
    got, labels = await _settled_counts(harness, want)
    assert got == want
    assert labels == {_series(port, harness)}
    # Toxiproxy's own e2e check greps this line (its scripts/test-e2e, listener resolved).
    line = (f'toxiproxy_proxy_sent_bytes_total{{direction="downstream",listener="127.0.0.1:{port}"'
            f',proxy="echo",upstream="127.0.0.1:{harness.echo_port}"}} ')  # fmt: skip
    assert line in (await harness.api.get("/metrics")).text


async def _goroutines(harness: Harness) -> float:
    text = (await harness.api.get("/metrics")).text
    [value] = [float(line.split()[1]) for line in text.splitlines()
               if line.startswith("go_goroutines ")]  # fmt: skip
    return value


@pytest.mark.trio
async def test_toxiproxys_runtime_metrics_name_the_runtime_and_count_live_tasks(
    harness: Harness,
) -> None:
    # Toxiproxy's e2e check greps ^go_info and ^go_goroutines (its -runtime-metrics).
    port = await harness.proxy()
    text = (await harness.api.get("/metrics")).text
    assert re.search(r'^go_info\{version="python3\.[0-9.]+ trio[0-9.]+"\} 1\.0$', text, re.M)
    idle = await _goroutines(harness)
    streams = [await _connect(port) for _ in range(5)]
    try:
        for stream in streams:  # each connection relayed: both directions alive
            assert (await _echoed(stream, MESSAGE))[0] == MESSAGE
        assert await _goroutines(harness) >= idle + 5
    finally:
        for stream in streams:
            await stream.aclose()
    # The relays end as the closes arrive: polled, bounded (METRICS_SETTLE_S).
    for _ in range(int(METRICS_SETTLE_S / 0.05)):
        if await _goroutines(harness) <= idle:
            break
        await trio.sleep(0.05)
    assert await _goroutines(harness) <= idle, "the closed connections' tasks ended"


@pytest.mark.trio
async def test_limit_data_shows_as_received_but_not_sent(harness: Harness) -> None:
    port = await harness.proxy(type="limit_data", stream="upstream", attributes={"bytes": 10})
    stream = await _connect(port)
    await stream.send_all(b"x" * 100)
    with trio.fail_after(5):
        while await stream.receive_some(1000):
            pass  # the echo of what passed, if it got back before the close
    await stream.aclose()
    received, sent = (f"{m}/upstream" for m in TOXIPROXY_METRICS)
    got, _ = await _settled_counts(harness, {received: 100.0, sent: 10.0})
    assert (got[received], got[sent]) == (100.0, 10.0), "read all, passed on only the limit"


@pytest.mark.trio
async def test_latency_delays_each_answer_and_toxicity_zero_never_applies(
    harness: Harness,
) -> None:
    slow = await harness.proxy("slow", type="latency", attributes={"latency": 300})
    spared = await harness.proxy("spared", type="latency", toxicity=0.0,
                                 attributes={"latency": 5000})  # fmt: skip
    got, took = await _round_trip(slow)
    assert got == MESSAGE and took >= 0.3
    _, spared_took = await _round_trip(spared)
    assert spared_took < 5


@pytest.mark.trio
async def test_toxics_apply_to_open_connections_and_timeout_drops_then_heals(
    harness: Harness,
) -> None:
    port = await harness.proxy()
    stream = await _connect(port)
    await stream.send_all(b"one")
    assert await stream.receive_some(100) == b"one"
    r = await harness.api.post("/proxies/echo/toxics",
                               json={"type": "timeout", "attributes": {"timeout": 0}})  # fmt: skip
    assert r.status_code == 200
    await stream.send_all(b"two")  # swallowed: timeout 0 holds the connection, passes nothing
    with trio.move_on_after(0.5) as waited:
        await stream.receive_some(100)
    assert waited.cancelled_caught
    await harness.api.delete("/proxies/echo/toxics/timeout_downstream")
    await stream.send_all(b"three")
    with trio.fail_after(5):
        assert await stream.receive_some(100) == b"three"
    await stream.aclose()


@pytest.mark.trio
async def test_timeout_closes_the_connection_after_its_time(harness: Harness) -> None:
    port = await harness.proxy(type="timeout", stream="upstream", attributes={"timeout": 300})
    stream = await _connect(port)
    started = trio.current_time()
    await stream.send_all(MESSAGE)
    with trio.fail_after(5):
        assert await stream.receive_some(100) == b""  # closed, nothing echoed
    assert trio.current_time() - started >= 0.3
    await stream.aclose()


@pytest.mark.trio
async def test_reset_peer_resets_the_connection(harness: Harness) -> None:
    port = await harness.proxy(type="reset_peer", stream="upstream", attributes={"timeout": 100})
    stream = await _connect(port)
    await stream.send_all(MESSAGE)
    with trio.fail_after(5), pytest.raises(trio.BrokenResourceError) as raised:
        await stream.receive_some(100)
    assert isinstance(raised.value.__cause__, ConnectionResetError)
    await stream.aclose()


@pytest.mark.trio
async def test_limit_data_closes_after_so_many_bytes(harness: Harness) -> None:
    port = await harness.proxy(type="limit_data", attributes={"bytes": 10})
    stream = await _connect(port)
    await stream.send_all(b"x" * 100)
    got = b""
    with trio.fail_after(5):
        while chunk := await stream.receive_some(1000):
            got += chunk
    assert got == b"x" * 10
    await stream.aclose()


@pytest.mark.trio
async def test_slicer_cuts_data_into_small_pieces_intact(harness: Harness) -> None:
    slices = {"average_size": 10, "size_variation": 3, "delay": 2000}
    port = await harness.proxy(type="slicer", attributes=slices)
    stream = await _connect(port)
    data = bytes(range(200))
    await stream.send_all(data)
    pieces: list[bytes] = []
    with trio.fail_after(5):
        while sum(map(len, pieces)) < len(data):
            pieces.append(await stream.receive_some(1000))
    assert b"".join(pieces) == data and len(pieces) >= 5
    await stream.aclose()


@pytest.mark.trio
async def test_bandwidth_caps_the_rate(harness: Harness) -> None:
    port = await harness.proxy(type="bandwidth", attributes={"rate": 100})  # 100 KB/s
    got, took = await _round_trip(port, b"y" * 50_000)
    assert got == b"y" * 50_000 and took >= 0.45


@pytest.mark.trio
async def test_slow_close_delays_the_close(harness: Harness) -> None:
    port = await harness.proxy(type="slow_close", attributes={"delay": 400})
    stream = await _connect(port)
    started = trio.current_time()
    await stream.send_all(b"close-me")
    got = b""
    with trio.fail_after(5):
        while chunk := await stream.receive_some(100):
            got += chunk
    assert got == b"bye" and trio.current_time() - started >= 0.4
    await stream.aclose()


@pytest.mark.trio
async def test_disable_enable_reset_and_populate(harness: Harness) -> None:
    api = harness.api
    port = await harness.proxy(type="latency", attributes={"latency": 50})
    listen = f"127.0.0.1:{port}"
    assert (await api.post("/proxies/echo", json={"enabled": False})).json()["enabled"] is False
    with pytest.raises(OSError, match="connect"):
        await _connect(port)
    assert (await api.post("/reset")).status_code == 204
    shown = (await api.get("/proxies/echo")).json()
    assert (shown["enabled"], shown["toxics"], shown["listen"]) == (True, [], listen)
    assert (await _round_trip(port))[0] == MESSAGE
    upstream = f"127.0.0.1:{harness.echo_port}"
    same = [{"name": "echo", "listen": listen, "upstream": upstream}]
    kept = await api.post("/populate", json=[*same, {"name": "two", "upstream": upstream}])
    assert kept.status_code == 201
    assert [p["name"] for p in kept.json()["proxies"]] == ["echo", "two"]
    invalid = await api.post("/populate", json=[{"name": "three", "upstream": upstream}, {}])
    assert invalid.status_code == 400 and "three" not in (await api.get("/proxies")).json()
    moved = await api.patch("/proxies/two", json={"listen": "127.0.0.1:0"})
    assert moved.status_code == 200
    assert (await _round_trip(int(moved.json()["listen"].rsplit(":", 1)[1])))[0] == MESSAGE
    assert (await api.delete("/proxies/two")).status_code == 204
    taken = await api.post("/proxies", json={"name": "clash", "listen": listen,
                                             "upstream": upstream})  # fmt: skip
    assert taken.status_code == 500 and "address already in use" in taken.json()["error"]


@pytest.mark.trio
async def test_valkey_through_the_proxy_under_latency_and_reset(
    harness: Harness, servers: ServerSet
) -> None:
    target = urlparse(servers.redis_url)
    upstream = f"{target.hostname}:{target.port}"
    body = {"name": "redis", "listen": "127.0.0.1:0", "upstream": upstream}
    r = await harness.api.post("/proxies", json=body)
    port = int(r.json()["listen"].rsplit(":", 1)[1])
    with redis.Redis(host="127.0.0.1", port=port, socket_timeout=5) as client:

        def ping() -> float:
            started = time.monotonic()
            assert client.ping() is True
            return time.monotonic() - started

        assert await trio.to_thread.run_sync(ping) < 5
        latency = {"type": "latency", "attributes": {"latency": 200}}
        await harness.api.post("/proxies/redis/toxics", json=latency)
        assert await trio.to_thread.run_sync(ping) >= 0.2
        await harness.api.post("/reset")
        reset = {"type": "reset_peer", "attributes": {"timeout": 0}}
        await harness.api.post("/proxies/redis/toxics", json=reset)
        with pytest.raises(redis.ConnectionError):
            await trio.to_thread.run_sync(client.ping)


def test_the_shipped_proxy_definitions_load() -> None:
    specs = load_specs(PROXIES_FILE)
    assert [s.name for s in specs] == ["postgres", "redis", "bank"]
