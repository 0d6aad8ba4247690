"""One direction of one connection relayed by an OS thread, off the trio event loop.

Why: with no toxic, the fault proxy's cost is its event loop's wake-up per chunk (a trio task
scheduled, run, parked again), and a request-and-answer protocol such as PostgreSQL's is all
small chunks. A thread that blocks in ``poll(2)`` and moves each chunk with two system calls
costs a few microseconds per chunk instead, and the kernel wakes it directly.

The thread only reads, writes and polls; it never closes a socket and never looks at toxics.
The trio side owns everything: it creates the relay (and its wake-up pipe), decides that a
direction may go by thread, asks the relay to stop (a flag, then a byte down the pipe, so that
a thread blocked in ``poll`` wakes at once), waits until the thread has returned, then closes
the pipe; the sockets are closed only after that, by the link's owner. A chunk the thread has
read when it sees the stop flag is handed back unsent, so that a toxic added meanwhile applies
to it (the next chunk after a change is judged by the trio side, as before).
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


class Outcome(Enum):
    EOF = "eof"  # the source ended (or was reset): the trio side passes the end on
    BROKEN = "broken"  # the sink went away: the link is over
    HANDED_BACK = "handed_back"  # stopped; data, if any, was read and is not yet judged
    UNSENT = "unsent"  # stopped in the middle of a chunk passed on: data is its unsent tail


class Relay:
    """Moves bytes from ``source_fd`` to ``sink_fd`` (both non-blocking sockets) until the
    source ends, the sink breaks, or ``stop`` is called. ``count(n)`` is called from the thread
    after every write of ``n`` bytes."""

    def __init__(self, source_fd: int, sink_fd: int, chunk_max: int,
                 count: Callable[[int], None]) -> None:  # fmt: skip
        self.source_fd, self.sink_fd = source_fd, sink_fd
        self.chunk_max = chunk_max
        self.count = count
        self.stopping = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def stop(self) -> None:
        """From the trio thread: the relay returns at its next look (at once if it waits)."""
        self.stopping = True
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"!")  # a full pipe has woken it already

    def close(self) -> None:
        """From the trio thread, once the relay's thread has returned."""
        os.close(self._wake_r)
        os.close(self._wake_w)

    def run(self) -> tuple[Outcome, bytes]:
        """The thread's body."""
        buffer = bytearray(self.chunk_max)
        view = memoryview(buffer)
        readable = select.poll()
        readable.register(self.source_fd, select.POLLIN)
        readable.register(self._wake_r, select.POLLIN)
        while True:
            readable.poll()
            if self.stopping:
                return Outcome.HANDED_BACK, b""
            try:
                size = os.readv(self.source_fd, [buffer])
            except BlockingIOError:
                continue
            except OSError:
                return Outcome.EOF, b""  # reset by the peer: as an end of stream
            if size == 0:
                return Outcome.EOF, b""
            if self.stopping:  # a toxic may have arrived while we read: let trio judge it
                return Outcome.HANDED_BACK, bytes(view[:size])
            result = self._send(view[:size])
            if result is not None:
                return result

    def _send(self, data: memoryview) -> tuple[Outcome, bytes] | None:
        writable: select.poll | None = None
        while data:
            try:
                sent = os.write(self.sink_fd, data)
            except BlockingIOError:
                if writable is None:
                    writable = select.poll()
                    writable.register(self.sink_fd, select.POLLOUT)
                    writable.register(self._wake_r, select.POLLIN)
                writable.poll()
                if self.stopping:
                    return Outcome.UNSENT, bytes(data)
                continue
            except OSError:
                return Outcome.BROKEN, b""
            self.count(sent)
            data = data[sent:]
        return None


async def run_in_thread(relay: Relay) -> tuple[Outcome, bytes]:
    """Runs ``relay`` in a thread of its own and waits for it. When the waiting task is
    cancelled the relay is stopped and still waited for (shielded; it returns at once), so
    that nobody closes a socket the thread may still use."""
    done = trio.Event()
    token = trio.lowlevel.current_trio_token()
    result: list[tuple[Outcome, bytes]] = []

    def body() -> None:
        try:
            result.append(relay.run())
        finally:
            token.run_sync_soon(done.set)

    thread = threading.Thread(target=body, name=THREAD_NAME, daemon=True)
    thread.start()
    try:
        await done.wait()
    finally:
        relay.stop()
        with trio.CancelScope(shield=True):
            await done.wait()
        thread.join()
    if not result:
        raise RuntimeError("the relay thread failed")
    return result[0]
