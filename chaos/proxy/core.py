"""The fault proxy's data path, on trio: proxies, the connections through them, and toxics.

Each accepted connection (a ``Link``) is piped both ways: "upstream" carries what the client
sends to the server, "downstream" what the server answers. Per direction a reader stamps each
chunk with its arrival time and queues it (bounded); a writer passes it through the proxy's
toxics of that stream, in order, as they are *now* (toxics apply to open connections too), and
sends it on. While no toxic applies to a direction and nothing of it is queued, the direction
is handed to the relay hub (chaos/proxy/_relay.py: one thread on epoll, read, write, off the
event loop, up to ``RELAY_THREADS_MAX`` directions at once), which is most of the proxy's cost
when it injects nothing. When the toxics change the relay is stopped and the reader judges the
next chunk again (a chunk the hub read after the change comes back unsent), so toxics still
apply to open connections from their next chunk on. Without a free slot the reader itself sends
each chunk on (straight non-blocking system calls, 64 KiB reads, no queue, no second task).
Whether a toxic applies to a connection is rolled once per connection and toxic version against
its toxicity. Semantics follow Toxiproxy's toxics:

- latency: each chunk leaves ``latency`` ± ``jitter`` ms after it arrived (so latency does not
  cut throughput);
- bandwidth: at most ``rate`` KB/s;
- slicer: chunks cut into pieces of about ``average_size`` ± ``size_variation`` bytes,
  ``delay`` µs apart;
- limit_data: the connection is closed once ``bytes`` have passed;
- timeout: nothing passes; the connection is closed ``timeout`` ms after the toxic took hold
  (0: held open until the toxic goes);
- reset_peer: at the next chunk, after ``timeout`` ms, both sides get a TCP reset;
- slow_close: when the source closes, the close reaches the other side ``delay`` ms later.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import random
import socket
import struct
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import trio

from chaos.proxy._relay import Outcome, Relay, run_relay
from chaos.proxy.model import (
    PROXY_EXISTS,
    PROXY_NOT_FOUND,
    TOXIC_EXISTS,
    TOXIC_NOT_FOUND,
    ApiError,
    ProxySpec,
    Toxic,
    parse_address,
)

CHUNK_MAX = 32 * 1024
DIRECT_CHUNK_MAX = 64 * 1024  # a read on the direct path (no toxic applies)
CHECKPOINT_EVERY = 16  # chunks a reader moves without yielding to the other tasks
QUEUED_CHUNKS_MAX = 64
# Directions moved by the relay hub at once, over every proxy; beyond, the direct path runs on
# the event loop (same behaviour, slower).
RELAY_THREADS_MAX = 256
CONNECT_TIMEOUT_S = 5.0
_CHANGED = object()  # queued to a writer when the toxics change
_EOF = object()


@dataclass
class Counters:
    """Per stream: ``received``, bytes read from its source; ``bytes``, bytes written to its
    sink (Toxiproxy's received and sent: they differ by what a toxic held back or cut)."""

    accepted: int = 0
    bytes: dict[str, int] = field(default_factory=lambda: {"upstream": 0, "downstream": 0})
    received: dict[str, int] = field(default_factory=lambda: {"upstream": 0, "downstream": 0})
    # Relay threads add to both too: an unlocked ``+=`` could lose an update.
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, stream: str, size: int) -> None:
        with self._lock:
            self.bytes[stream] += size

    def add_received(self, stream: str, size: int) -> None:
        with self._lock:
            self.received[stream] += size


class _Closed(Exception):
    """The link is over (a toxic closed it, or a side went away)."""


class Link:
    def __init__(self, proxy: Proxy, client: trio.SocketStream, rng: random.Random) -> None:
        self.proxy = proxy
        self.client = client
        self.server: trio.SocketStream | None = None
        self.rng = rng
        self.scope = trio.CancelScope()
        self.reset = False
        self.queues: dict[str, trio.MemorySendChannel[Any]] = {}
        self._applies: dict[tuple[str, int], bool] = {}
        self._since: dict[tuple[str, int], float] = {}  # when a toxic took hold here
        self._limit_sent: dict[str, int] = {}
        # Chunks a reader queued that its writer has not finished passing on, per stream.
        self._queued: dict[str, int] = {"upstream": 0, "downstream": 0}
        self._relays: dict[str, Relay] = {}  # directions a thread moves now
        # A reader waiting on the event loop, to be woken to judge its direction again (when
        # the toxics change, or its queue drains) so that it goes back to a thread at once.
        self._waiting: dict[str, trio.CancelScope] = {}

    def close(self, reset: bool = False) -> None:
        self.reset = self.reset or reset
        self.scope.cancel()

    def changed(self) -> None:
        for relay in list(self._relays.values()):
            relay.stop()  # its direction is judged again, by the reader
        for stream in list(self._waiting):
            self._rejudge(stream)
        for queue in self.queues.values():
            with contextlib.suppress(trio.WouldBlock, trio.ClosedResourceError):
                queue.send_nowait(_CHANGED)

    def _active(self, stream: str) -> list[Toxic]:
        active = []
        for toxic in self.proxy.toxics:
            if toxic.stream != stream:
                continue
            key = (toxic.name, toxic.version)
            if key not in self._applies:
                self._applies[key] = self.rng.random() < toxic.toxicity
                self._since[key] = trio.current_time()
            if self._applies[key]:
                active.append(toxic)
        return active

    def _deadline(self, stream: str) -> float:
        """When a timeout toxic of this stream closes the link (inf: never)."""
        deadline = math.inf
        for toxic in self._active(stream):
            if toxic.type == "timeout" and toxic.attr("timeout") > 0:
                since = self._since[(toxic.name, toxic.version)]
                deadline = min(deadline, since + toxic.attr("timeout") / 1000)
        return deadline

    async def run(self) -> None:
        host, port = parse_address(self.proxy.spec.upstream, "upstream")
        with self.scope:
            try:
                with trio.fail_after(CONNECT_TIMEOUT_S):
                    self.server = await trio.open_tcp_stream(host, port)
            except (OSError, trio.TooSlowError):
                return  # Toxiproxy's behaviour too: the client's connection is closed
            async with trio.open_nursery() as nursery:
                for stream, source, sink in (
                    ("upstream", self.client, self.server),
                    ("downstream", self.server, self.client),
                ):
                    send, receive = trio.open_memory_channel[Any](QUEUED_CHUNKS_MAX)
                    self.queues[stream] = send
                    nursery.start_soon(self._read, stream, source, sink, send)
                    nursery.start_soon(self._write, stream, receive, sink)

    def _direct(self, stream: str) -> bool:
        """Whether the next chunk of ``stream`` may skip the queue and the toxics: none of the
        proxy's toxics applies to it, and nothing earlier is still queued or on its way out
        (order is kept)."""
        return self._queued[stream] == 0 and not (self.proxy.toxics and self._active(stream))

    async def _read(self, stream: str, source: trio.SocketStream, sink: trio.SocketStream,
                    queue: trio.MemorySendChannel[Any]) -> None:  # fmt: skip
        source_fd, sink_fd = source.socket.fileno(), sink.socket.fileno()
        chunks, more = 0, False
        while True:
            direct = self._direct(stream)
            if direct and self.proxy.relays.available_tokens > 0:
                outcome, data = await self._relay(stream, source_fd, sink_fd)
                if outcome is Outcome.EOF:
                    break
                if outcome is Outcome.BROKEN:
                    self.close()  # as the writer does when its side goes away
                    return
                if outcome is Outcome.UNSENT:  # the rest of a chunk already passed on
                    if not await self._send_direct(stream, sink_fd, data):
                        return
                    continue
                if not data:
                    continue  # the toxics changed: judge the next chunk again
                more = False
            else:
                try:
                    size_max = DIRECT_CHUNK_MAX if direct else CHUNK_MAX
                    read = await self._receive(stream, source_fd, size_max, more)
                    if read is None:
                        continue  # woken to judge again: nothing was read
                    data = read
                    more = len(data) == size_max
                    self.proxy.counters.add_received(stream, len(data))
                except OSError:
                    break  # reset by the peer: as an end of stream
                if not data:
                    break
            # Checked again: a toxic added while we waited applies to this chunk.
            if direct and self._direct(stream):
                if not await self._send_direct(stream, sink_fd, data):
                    return
            else:
                self._queued[stream] += 1
                await queue.send((trio.current_time(), data))
            chunks += 1
            if chunks % CHECKPOINT_EVERY == 0:
                await trio.lowlevel.checkpoint()  # a busy stream must not starve the others
        await queue.send(_EOF)

    def _rejudge(self, stream: str) -> None:
        """Wakes the reader of ``stream`` if it waits on the event loop and could now hand its
        direction to a thread (it judges again before reading anything)."""
        waiting = self._waiting.get(stream)
        if waiting is not None and self._direct(stream) and self.proxy.relays.available_tokens:
            waiting.cancel()

    async def _receive(self, stream: str, fd: int, size_max: int, more: bool) -> bytes | None:
        """A read on the event loop; None when ``_rejudge`` cut the wait short."""
        with trio.CancelScope() as waiting:
            self._waiting[stream] = waiting
            try:
                return await _receive(fd, size_max, more)
            finally:
                del self._waiting[stream]
        return None

    async def _send_direct(self, stream: str, sink_fd: int, data: bytes) -> bool:
        """Sends ``data`` past the toxics; False (and the link closed) if the sink is gone."""
        try:
            await _send(sink_fd, data)
        except OSError:
            self.close()  # as the writer does when its side goes away
            return False
        self.proxy.counters.add(stream, len(data))
        return True

    async def _relay(self, stream: str, source_fd: int, sink_fd: int) -> tuple[Outcome, bytes]:
        """The direction moved by the relay hub until it ends or the toxics change."""
        borrower = (self, stream)
        self.proxy.relays.acquire_on_behalf_of_nowait(borrower)
        try:
            counters = self.proxy.counters
            relay = Relay(source_fd, sink_fd, DIRECT_CHUNK_MAX,
                          functools.partial(counters.add, stream),
                          functools.partial(counters.add_received, stream))  # fmt: skip
            self._relays[stream] = relay
            try:
                return await run_relay(relay)
            finally:
                del self._relays[stream]
                relay.close()
        finally:
            self.proxy.relays.release_on_behalf_of(borrower)

    async def _write(self, stream: str, queue: trio.MemoryReceiveChannel[Any],
                     sink: trio.SocketStream) -> None:  # fmt: skip
        try:
            while True:
                item: Any = _CHANGED
                with trio.move_on_at(self._deadline(stream)) as waited:
                    item = await queue.receive()
                if waited.cancelled_caught:
                    raise _Closed  # a timeout toxic's time is up
                if item is _CHANGED:
                    continue
                if item is _EOF:
                    await self._slow_close(stream)
                    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                        await sink.send_eof()
                    return
                arrived, data = item
                try:
                    await self._pass(stream, arrived, data, sink)
                finally:
                    self._queued[stream] -= 1
                if self._queued[stream] == 0:
                    self._rejudge(stream)
        except _Closed:
            self.close()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.close()

    async def _slow_close(self, stream: str) -> None:
        for toxic in self._active(stream):
            if toxic.type == "slow_close":
                await trio.sleep(toxic.attr("delay") / 1000)

    async def _pass(self, stream: str, arrived: float, data: bytes,
                    sink: trio.SocketStream) -> None:  # fmt: skip
        pieces: list[tuple[bytes, float]] = [(data, 0.0)]  # (bytes, pause after, seconds)
        close_after = False
        for toxic in self._active(stream):
            kind = toxic.type
            if kind == "timeout":
                return  # swallowed; the writer's deadline closes the link
            if kind == "reset_peer":
                await trio.sleep(toxic.attr("timeout") / 1000)
                self.close(reset=True)
                raise _Closed
            if kind == "latency":
                jitter = toxic.attr("jitter")
                delay_ms = toxic.attr("latency") + (
                    self.rng.uniform(-jitter, jitter) if jitter else 0
                )
                await trio.sleep_until(arrived + max(0.0, delay_ms) / 1000)
            elif kind == "bandwidth" and toxic.attr("rate") > 0:
                await trio.sleep(len(data) / (toxic.attr("rate") * 1000))
            elif kind == "slicer":
                pieces = [p for whole, _ in pieces for p in self._slices(whole, toxic)]
            elif kind == "limit_data":
                pieces, close_after = self._limit(toxic, pieces)
        for piece, pause_s in pieces:
            await sink.send_all(piece)
            self.proxy.counters.add(stream, len(piece))
            if pause_s:
                await trio.sleep(pause_s)
        if close_after:
            raise _Closed

    def _slices(self, data: bytes, toxic: Toxic) -> Iterator[tuple[bytes, float]]:
        size, spread = max(1, toxic.attr("average_size")), toxic.attr("size_variation")
        pause_s = toxic.attr("delay") / 1_000_000
        start = 0
        while start < len(data):
            take = max(1, size + (self.rng.randint(-spread, spread) if spread else 0))
            yield data[start : start + take], pause_s
            start += take

    def _limit(self, toxic: Toxic, pieces: list[tuple[bytes, float]]
               ) -> tuple[list[tuple[bytes, float]], bool]:  # fmt: skip
        key = f"{toxic.name}/{toxic.stream}"
        left = toxic.attr("bytes") - self._limit_sent.get(key, 0)
        kept: list[tuple[bytes, float]] = []
        for piece, pause_s in pieces:
            if left <= 0:
                break
            kept.append((piece[:left], pause_s))
            left -= len(kept[-1][0])
        self._limit_sent[key] = toxic.attr("bytes") - max(left, 0)
        return kept, left <= 0


async def _receive(fd: int, size_max: int, more: bool) -> bytes:
    """One read of at most ``size_max`` bytes from a non-blocking socket; b"" at its end.
    Straight system calls: the direct path's cost per chunk is the proxy's throughput. Unless
    ``more`` (the last read filled its buffer, so more is likely waiting) it waits first: in a
    request-and-answer protocol a read tried at once mostly fails, and costs a call."""
    if not more:
        await trio.lowlevel.wait_readable(fd)
    while True:
        try:
            return os.read(fd, size_max)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(fd)


async def _send(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            await trio.lowlevel.wait_writable(fd)


def _reset_on_close(stream: trio.SocketStream) -> None:
    with contextlib.suppress(OSError):
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class Proxy:
    def __init__(self, spec: ProxySpec, nursery: trio.Nursery, seed: int,
                 relays: trio.CapacityLimiter) -> None:  # fmt: skip
        self.spec = spec
        self.relays = relays  # the relay hub's slots, shared by every proxy of the collection
        self.toxics: list[Toxic] = []
        self.counters = Counters()
        self._nursery = nursery
        self._rng = random.Random(seed)
        self._listener_scope: trio.CancelScope | None = None
        self._serving_done: trio.Event | None = None
        self.links: set[Link] = set()

    @property
    def enabled(self) -> bool:
        return self._listener_scope is not None

    async def start(self) -> None:
        if self.enabled:
            return
        await self.stopped()  # the previous listener has let go of the port
        host, port = parse_address(self.spec.listen, "listen")
        try:
            listeners = await trio.open_tcp_listeners(port, host=host)
        except OSError as exc:
            raise ApiError(409, f"listen {self.spec.listen}: {exc.strerror or exc}") from None
        bound = listeners[0].socket.getsockname()
        self.spec = dataclasses.replace(self.spec, listen=_address(bound[0], bound[1]),
                                        enabled=True)  # fmt: skip
        self._listener_scope = await self._nursery.start(self._serve, listeners)

    async def _serve(self, listeners: list[trio.SocketListener],
                     task_status: trio.TaskStatus[trio.CancelScope]) -> None:  # fmt: skip
        done = self._serving_done = trio.Event()
        try:
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as links:
                    task_status.started(scope)
                    await trio.serve_listeners(self._handle, listeners, handler_nursery=links)
        finally:
            with trio.CancelScope(shield=True):
                for listener in listeners:
                    await listener.aclose()
            done.set()

    async def _handle(self, client: trio.SocketStream) -> None:
        self.counters.accepted += 1
        link = Link(self, client, random.Random(self._rng.random()))
        self.links.add(link)
        try:
            await link.run()
        except Exception as exc:  # one connection's bug must not take the proxy down
            print(f"kizo proxy: {self.spec.name}: connection failed: {exc!r}", file=sys.stderr)
        finally:
            self.links.discard(link)
            with trio.CancelScope(shield=True):
                for stream in (client, link.server):
                    if stream is not None:
                        if link.reset:
                            _reset_on_close(stream)
                        await stream.aclose()

    def stop(self) -> None:
        """Stop listening and drop every connection (Toxiproxy's "disabled")."""
        if self._listener_scope is not None:
            self._listener_scope.cancel()
            self._listener_scope = None
        for link in list(self.links):
            link.close()

    async def stopped(self) -> None:
        """Wait until a stop has taken effect (connections closed, port released)."""
        if self._serving_done is not None and self._listener_scope is None:
            await self._serving_done.wait()

    def _changed(self) -> None:
        for link in self.links:
            link.changed()

    def toxic(self, name: str) -> Toxic:
        for toxic in self.toxics:
            if toxic.name == name:
                return toxic
        raise TOXIC_NOT_FOUND

    def add_toxic(self, toxic: Toxic) -> None:
        if any(t.name == toxic.name for t in self.toxics):
            raise TOXIC_EXISTS
        self.toxics.append(toxic)
        self._changed()

    def replace_toxic(self, toxic: Toxic) -> None:
        self.toxics = [toxic if t.name == toxic.name else t for t in self.toxics]
        self._changed()

    def remove_toxic(self, name: str) -> None:
        self.toxic(name)
        self.toxics = [t for t in self.toxics if t.name != name]
        self._changed()

    def clear_toxics(self) -> None:
        self.toxics = []
        self._changed()


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Collection:
    """Every proxy of one fault proxy process, by name."""

    def __init__(self, nursery: trio.Nursery, seed: int = 0) -> None:
        self._nursery = nursery
        self._seed = seed
        self.proxies: dict[str, Proxy] = {}
        self.relays = trio.CapacityLimiter(RELAY_THREADS_MAX)

    def get(self, name: str) -> Proxy:
        proxy = self.proxies.get(name)
        if proxy is None:
            raise PROXY_NOT_FOUND
        return proxy

    async def add(self, spec: ProxySpec) -> Proxy:
        if spec.name in self.proxies:
            raise PROXY_EXISTS
        proxy = Proxy(spec, self._nursery, self._seed + len(self.proxies), self.relays)
        if spec.enabled:
            await proxy.start()
        self.proxies[spec.name] = proxy
        return proxy

    async def remove(self, name: str) -> None:
        proxy = self.get(name)
        proxy.stop()
        del self.proxies[name]
        await proxy.stopped()

    async def reset(self) -> None:
        """Every proxy enabled, every toxic gone."""
        for proxy in self.proxies.values():
            proxy.clear_toxics()
            await proxy.start()
