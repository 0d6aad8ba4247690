"""The fault proxy's relay threads: with no toxic a direction's bytes move in a thread of its own;
a toxic added to the live connection takes hold, removing it hands the direction back to a
thread, the byte counters stay exact, and deleting the proxy or stopping the process ends every
thread and closes every descriptor."""

from __future__ import annotations

import functools
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest
import trio

from chaos.proxy import core
from chaos.proxy._relay import active_relays, hub_running
from chaos.proxy.core import Collection
from chaos.proxy.model import ProxySpec
from chaos.proxy.server import serve
from tests.test_fault_proxy import _echo, _echoed  # the same echo server and client

WAIT_STEPS_MAX = 500  # of 10 ms: how long a test waits for the proxy to reach a state


@dataclass
class Setup:
    collection: Collection
    api: httpx.AsyncClient
    port: int  # the proxy "echo", in front of an echo server
    scope: trio.CancelScope  # the proxy process's


@pytest.fixture
async def setup(nursery: trio.Nursery) -> AsyncIterator[Setup]:
    [echo] = await nursery.start(functools.partial(trio.serve_tcp, _echo, 0, host="127.0.0.1"))
    echo_port = echo.socket.getsockname()[1]
    scope = trio.CancelScope()

    async def proxy_process(task_status: trio.TaskStatus[tuple[Collection, int]]) -> None:
        with scope:
            await serve("127.0.0.1", 0, [], 3, task_status=task_status)

    collection, api_port = await nursery.start(proxy_process)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api_port}", timeout=10) as api:
        body = {"name": "echo", "listen": "127.0.0.1:0", "upstream": f"127.0.0.1:{echo_port}"}
        r = await api.post("/proxies", json=body)
        assert r.status_code == 201, r.text
        yield Setup(collection, api, int(r.json()["listen"].rsplit(":", 1)[1]), scope)
    nursery.cancel_scope.cancel()


def _relay_threads() -> int:
    """Directions the relay hub moves now (one thread moves them all)."""
    return active_relays()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def _until(condition: object) -> None:
    assert callable(condition)
    for _ in range(WAIT_STEPS_MAX):
        if condition():
            return
        await trio.sleep(0.01)
    raise AssertionError("the proxy did not get there in time")


async def _counted(collection: Collection, each_way: int) -> None:
    """A relay thread counts a write once it returns, maybe just after the peer has read it:
    the counters are waited for, and must then be exact."""
    counters = collection.get("echo").counters.bytes
    await _until(lambda: sum(counters.values()) >= 2 * each_way)
    assert counters == {"upstream": each_way, "downstream": each_way}


@pytest.mark.trio
async def test_a_toxic_switched_on_and_off_over_a_live_connection(setup: Setup) -> None:
    before = _relay_threads()
    stream = await trio.open_tcp_stream("127.0.0.1", setup.port)
    assert (await _echoed(stream, b"by thread"))[0] == b"by thread"
    await _until(lambda: _relay_threads() == before + 2)  # one per direction
    latency = {"type": "latency", "attributes": {"latency": 300}}
    assert (await setup.api.post("/proxies/echo/toxics", json=latency)).status_code == 200
    # The downstream thread hands back; the next chunk goes through the toxic.
    got, took = await _echoed(stream, b"slowed")
    assert got == b"slowed" and took >= 0.3
    await _until(lambda: _relay_threads() == before + 1)  # upstream has no toxic: still a thread
    await setup.api.delete("/proxies/echo/toxics/latency_downstream")
    await _until(lambda: _relay_threads() == before + 2)
    big = bytes(range(256)) * 1024  # several chunks each way
    assert (await _echoed(stream, big))[0] == big
    sent = len(b"by thread") + len(b"slowed") + len(big)
    await _counted(setup.collection, sent)
    await stream.aclose()
    await _until(lambda: _relay_threads() == before)


@pytest.mark.trio
async def test_many_connections_at_once_count_every_byte(setup: Setup) -> None:
    data = os.urandom(100_000)

    async def client() -> None:
        stream = await trio.open_tcp_stream("127.0.0.1", setup.port)
        for _ in range(5):
            assert (await _echoed(stream, data))[0] == data
        await stream.aclose()

    async with trio.open_nursery() as clients:
        for _ in range(8):
            clients.start_soon(client)
    total = 8 * 5 * len(data)
    await _counted(setup.collection, total)


@pytest.mark.trio
async def test_reset_peer_reaches_a_connection_a_thread_is_moving(setup: Setup) -> None:
    before = _relay_threads()
    stream = await trio.open_tcp_stream("127.0.0.1", setup.port)
    await _echoed(stream, b"first")
    await _until(lambda: _relay_threads() == before + 2)
    reset = {"type": "reset_peer", "stream": "upstream", "attributes": {"timeout": 0}}
    assert (await setup.api.post("/proxies/echo/toxics", json=reset)).status_code == 200
    await stream.send_all(b"second")
    with trio.fail_after(5), pytest.raises(trio.BrokenResourceError) as raised:
        await stream.receive_some(100)
    assert isinstance(raised.value.__cause__, ConnectionResetError)
    await stream.aclose()
    await _until(lambda: _relay_threads() == before)


@pytest.mark.trio
async def test_a_half_close_passes_through_a_thread(setup: Setup) -> None:
    before = _relay_threads()
    stream = await trio.open_tcp_stream("127.0.0.1", setup.port)
    await _echoed(stream, b"ping")
    await _until(lambda: _relay_threads() == before + 2)
    await stream.send_eof()  # the echo server answers our end with its own
    with trio.fail_after(5):
        assert await stream.receive_some(100) == b""
    await stream.aclose()
    await _until(lambda: _relay_threads() == before)


@pytest.mark.trio
async def test_deleting_the_proxy_ends_its_threads_and_closes_its_sockets(setup: Setup) -> None:
    before_threads, before_fds = _relay_threads(), _open_fds()
    streams = [await trio.open_tcp_stream("127.0.0.1", setup.port) for _ in range(3)]
    for stream in streams:
        await _echoed(stream, b"hello")
    await _until(lambda: _relay_threads() == before_threads + 6)
    assert (await setup.api.delete("/proxies/echo")).status_code == 204
    assert _relay_threads() == before_threads  # the delete waited for them
    for stream in streams:
        with trio.fail_after(5):
            assert await stream.receive_some(100) == b""  # the proxy closed its side
        await stream.aclose()
    # Ours are closed; the echo server closes its side once it sees the proxy's end.
    await _until(lambda: _open_fds() <= before_fds)


@pytest.mark.trio
async def test_stopping_the_process_ends_every_thread(setup: Setup) -> None:
    before = _relay_threads()
    streams = [await trio.open_tcp_stream("127.0.0.1", setup.port) for _ in range(2)]
    for stream in streams:
        await _echoed(stream, b"hello")
    await _until(lambda: _relay_threads() == before + 4)
    setup.scope.cancel()
    await _until(lambda: _relay_threads() == before)
    await _until(lambda: not hub_running())  # the hub ends with its last relay
    for stream in streams:
        with trio.fail_after(5):
            assert await stream.receive_some(100) == b""
        await stream.aclose()


@pytest.mark.trio
async def test_without_a_free_thread_the_event_loop_moves_the_bytes(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(core, "RELAY_THREADS_MAX", 1)  # one direction by thread, one on trio
    [echo] = await nursery.start(functools.partial(trio.serve_tcp, _echo, 0, host="127.0.0.1"))
    collection, _ = await nursery.start(serve, "127.0.0.1", 0, [], 3)
    upstream = f"127.0.0.1:{echo.socket.getsockname()[1]}"
    proxy = await collection.add(ProxySpec("echo", "127.0.0.1:0", upstream))
    stream = await trio.open_tcp_stream("127.0.0.1", int(proxy.spec.listen.rsplit(":", 1)[1]))
    big = os.urandom(300_000)
    assert (await _echoed(stream, big))[0] == big
    assert collection.relays.borrowed_tokens == 1
    await _counted(collection, len(big))
    await stream.aclose()
    nursery.cancel_scope.cancel()
