"""Directions of connections relayed off the trio event loop, all by one thread on epoll.

Why: with no toxic, the fault proxy's cost is a wake-up per chunk, and a request-and-answer
protocol such as PostgreSQL's is all small chunks. A trio task wakes through the whole event
loop; a thread per direction wakes alone for each message, and eight busy connections mean
sixteen threads taking turns for the interpreter. One thread waiting in ``epoll_wait`` on every
relayed direction instead wakes once for whatever is ready together (as Go's netpoller does for
Toxiproxy), then reads and writes each ready chunk with two system calls.

The hub only reads, writes and polls; it never closes a socket it was given and never looks at
toxics. The trio side owns everything: it hands a relay to the hub (``run_relay``), asks it to
stop (``Relay.stop``: a flag, and a command through the hub's wake-up pipe), and waits until
the hub has finished it before anyone closes the sockets. A chunk read when the stop arrives is
handed back unsent, so that a toxic added meanwhile applies to it. A sink that cannot take a
whole chunk is waited for on a duplicate of its descriptor (the same socket may be another
relay's source), its source left unread meanwhile: backpressure as before.

The hub thread starts with the first relay and ends when it has none left.
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
from collections.abc import Callable
from enum import Enum

import trio

THREAD_NAME = "kizo-proxy-relay"
EVENTS_MAX = 256  # per epoll_wait


class Outcome(Enum):
    EOF = "eof"  # the source ended (or was reset): the trio side passes the end on
    BROKEN = "broken"  # the sink went away: the link is over
    HANDED_BACK = "handed_back"  # stopped; data, if any, was read and is not yet judged
    UNSENT = "unsent"  # stopped in the middle of a chunk passed on: data is its unsent tail


class Relay:
    """Moves bytes from ``source_fd`` to ``sink_fd`` (both non-blocking sockets) until the
    source ends, the sink breaks, or ``stop`` is called. ``count(n)`` is called from the hub
    after every write of ``n`` bytes, ``count_read(n)`` after every read."""

    def __init__(self, source_fd: int, sink_fd: int, chunk_max: int,
                 count: Callable[[int], None],
                 count_read: Callable[[int], None] = lambda _n: None) -> None:  # fmt: skip
        self.source_fd, self.sink_fd = source_fd, sink_fd
        self.chunk_max = chunk_max
        self.count = count
        self.count_read = count_read
        self.stopping = False
        self.pending = b""  # a chunk's tail the sink could not take yet
        self.sink_dup: int | None = None  # registered for EPOLLOUT while ``pending``
        self.result: tuple[Outcome, bytes] | None = None
        self.finished: Callable[[], None] = lambda: None

    def stop(self) -> None:
        """From the trio thread: the hub finishes the relay at its next look."""
        self.stopping = True
        HUB.submit("stop", self)

    def close(self) -> None:
        """From the trio thread, once the relay is finished: nothing is left to release (the
        hub closes the descriptor it duplicated when it finishes the relay)."""


class _Hub:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._commands: list[tuple[str, Relay]] = []
        self._thread: threading.Thread | None = None
        self._active = 0  # relays handed to the hub and not finished yet
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    @property
    def active(self) -> int:
        with self._lock:
            return self._active

    def submit(self, command: str, relay: Relay) -> None:
        with self._lock:
            self._commands.append((command, relay))
            self._active += command == "add"
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)
                self._thread.start()
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"!")  # a full pipe has woken it already

    def _run(self) -> None:
        loop = _Loop(self._wake_r)
        try:
            while True:
                with self._lock:
                    commands, self._commands = self._commands, []
                    if not commands and not loop.relays:
                        self._thread = None  # the next submit starts another
                        return
                self._finished(loop.apply(commands))
                if loop.relays:
                    self._finished(loop.poll_once())
        finally:
            loop.close()

    def _finished(self, done: list[Relay]) -> None:
        if done:
            with self._lock:
                self._active -= len(done)
            for relay in done:
                relay.finished()


class _Loop:
    """The hub thread's state: its epoll, the relays and which descriptor stands for which."""

    def __init__(self, wake_fd: int) -> None:
        self.wake_fd = wake_fd
        self.epoll = select.epoll()
        self.epoll.register(wake_fd, select.EPOLLIN)
        self.relays: set[Relay] = set()
        self.by_fd: dict[int, Relay] = {}
        self.buffer = bytearray(64 * 1024)

    def close(self) -> None:
        self.epoll.close()

    def apply(self, commands: list[tuple[str, Relay]]) -> list[Relay]:
        done: list[Relay] = []
        for command, relay in commands:
            if command == "add":
                try:
                    self.epoll.register(relay.source_fd, select.EPOLLIN)
                except OSError:  # a socket gone already: nothing to relay
                    relay.result = (Outcome.BROKEN, b"")
                    done.append(relay)
                    continue
                self.relays.add(relay)
                self.by_fd[relay.source_fd] = relay
            if relay in self.relays and relay.stopping:  # an add after its stop included
                done.append(self._finish(relay, Outcome.UNSENT if relay.pending
                                         else Outcome.HANDED_BACK, relay.pending))  # fmt: skip
        return done

    def poll_once(self) -> list[Relay]:
        done: list[Relay] = []
        for fd, _events in self.epoll.poll(-1, EVENTS_MAX):
            if fd == self.wake_fd:
                with contextlib.suppress(BlockingIOError):
                    os.read(self.wake_fd, 4096)
                continue
            relay = self.by_fd.get(fd)
            if relay is None or relay.result is not None:
                continue  # finished earlier in this round
            finished = self._flush(relay) if fd == relay.sink_dup else self._move(relay)
            if finished is not None:
                done.append(self._finish(relay, *finished))
        return done

    def _move(self, relay: Relay) -> tuple[Outcome, bytes] | None:
        if relay.stopping:
            return Outcome.HANDED_BACK, b""
        view = memoryview(self.buffer)[: relay.chunk_max]
        try:
            size = os.readv(relay.source_fd, [view])
        except BlockingIOError:
            return None
        except OSError:
            return Outcome.EOF, b""  # reset by the peer: as an end of stream
        if size == 0:
            return Outcome.EOF, b""
        relay.count_read(size)  # counted once: a chunk handed back is not read again
        if relay.stopping:  # a toxic may have arrived while we read: let trio judge it
            return Outcome.HANDED_BACK, bytes(view[:size])
        return self._write(relay, view[:size])

    def _write(self, relay: Relay, data: memoryview | bytes) -> tuple[Outcome, bytes] | None:
        while data:
            try:
                sent = os.write(relay.sink_fd, data)
            except BlockingIOError:
                self._wait_for_sink(relay, bytes(data))
                return None
            except OSError:
                return Outcome.BROKEN, b""
            relay.count(sent)
            data = data[sent:]
        return None

    def _wait_for_sink(self, relay: Relay, tail: bytes) -> None:
        relay.pending = tail
        self.epoll.modify(relay.source_fd, 0)  # read no more until the sink takes this
        if relay.sink_dup is None:
            relay.sink_dup = os.dup(relay.sink_fd)
            self.by_fd[relay.sink_dup] = relay
            self.epoll.register(relay.sink_dup, select.EPOLLOUT)

    def _flush(self, relay: Relay) -> tuple[Outcome, bytes] | None:
        if relay.stopping:
            return Outcome.UNSENT, relay.pending
        tail, relay.pending = relay.pending, b""
        finished = self._write(relay, tail)
        if finished is None and not relay.pending:  # all taken: read the source again
            self._drop_dup(relay)
            self.epoll.modify(relay.source_fd, select.EPOLLIN)
        return finished

    def _drop_dup(self, relay: Relay) -> None:
        if relay.sink_dup is not None:
            self.epoll.unregister(relay.sink_dup)
            del self.by_fd[relay.sink_dup]
            os.close(relay.sink_dup)
            relay.sink_dup = None

    def _finish(self, relay: Relay, outcome: Outcome, data: bytes) -> Relay:
        self._drop_dup(relay)
        self.epoll.unregister(relay.source_fd)
        del self.by_fd[relay.source_fd]
        self.relays.discard(relay)
        relay.pending = b""
        relay.result = (outcome, data)
        return relay


HUB = _Hub()


def active_relays() -> int:
    """Directions the hub moves now (for tests and metrics)."""
    return HUB.active


def hub_running() -> bool:
    return any(t.name == THREAD_NAME and t.is_alive() for t in threading.enumerate())


async def run_relay(relay: Relay) -> tuple[Outcome, bytes]:
    """Hands ``relay`` to the hub and waits until it is finished. When the waiting task is
    cancelled the relay is stopped and still waited for (shielded; it is finished at the hub's
    next look), so that nobody closes a socket the hub may still use."""
    done = trio.Event()
    token = trio.lowlevel.current_trio_token()

    def finished() -> None:
        with contextlib.suppress(trio.RunFinishedError):  # the process is ending anyway
            token.run_sync_soon(done.set)

    relay.finished = finished
    HUB.submit("add", relay)
    try:
        await done.wait()
    finally:
        if relay.result is None:
            relay.stop()
            with trio.CancelScope(shield=True):
                await done.wait()
    assert relay.result is not None
    return relay.result
