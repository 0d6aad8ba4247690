""" "Process then drop the answer": the payment is committed, the caller gets no response at all.
(The lose fault uses the same way out with the header's value ``lose``: nothing was committed.)

ASGI offers no way to abort a connection, and granian answers 500 when an app raises before its
body starts (measured with granian 2.8.7: raising before or at ``http.response.start`` yields
``500 Internal server error``; only a half-sent body makes it cut the connection, and by then
the status line is out). So a handler marks its response with ``DROP_HEADER`` and ``DropAnswers``
(the outermost ASGI layer) swallows that response and shuts the caller's TCP socket down itself:
it finds the socket among this process's descriptors by its two addresses and calls
``shutdown(SHUT_RDWR)`` on a duplicate (the server keeps its own descriptor and closes it as
usual). The caller sees the connection closed without a response ("Server disconnected without
sending a response" in httpx), exactly what a lost answer looks like.

That lookup is Linux-only (/proc/self/fd). Where it fails, or with drop mode ``hold``, the
response waits ``hold_s`` (beyond any client timeout) and then goes out as 504.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import structlog

from chaos.mockbank.settings import DropMode

DROP_HEADER = b"x-mockbank-drop"
# A bound on the scan: this process holds a few dozen descriptors (pool, listener, clients).
FDS_SCANNED_MAX = 4096
_FD_DIR = "/proc/self/fd"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

log = structlog.get_logger("kizo.mockbank")


def _address(pair: Any) -> tuple[str, int] | None:
    """ASGI servers differ on the port's type (granian passes a string)."""
    try:
        host, port = pair[0], pair[1]
        return str(host), int(port)
    except (TypeError, ValueError, IndexError):
        return None


def _matches(fd: int, peer: tuple[str, int], local_port: int) -> socket.socket | None:
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            return None
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        return None
    try:
        tcp = sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM
        if tcp and sock.getpeername()[:2] == peer and sock.getsockname()[1] == local_port:
            return sock
    except OSError:
        pass
    sock.close()
    return None


def shutdown_connection(scope: Scope) -> bool:
    """Shut down the TCP connection that carries ``scope``; False when it cannot be found."""
    peer, local = _address(scope.get("client")), _address(scope.get("server"))
    if peer is None or local is None:
        return False
    try:
        names = os.listdir(_FD_DIR)[:FDS_SCANNED_MAX]
    except OSError:
        return False
    for name in names:
        sock = _matches(int(name), peer, local[1])
        if sock is not None:
            with sock:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    return False
            return True
    return False


def _dropped(message: Message) -> bytes | None:
    """The drop header's value (``lose``: the request was never acted on), None if absent."""
    if message["type"] != "http.response.start":
        return None
    for name, value in message.get("headers", ()):
        if name.lower() == DROP_HEADER:
            return bytes(value)
    return None


def _gateway_timeout(lost: bool) -> tuple[Message, Message]:
    detail = ("injected fault: the request was lost, nothing was processed" if lost
              else "injected fault: the payment was processed, the answer withheld")  # fmt: skip
    body = json.dumps(
        {
            "type": "/problems/answer-dropped",
            "title": "Answer dropped",
            "status": 504,
            "detail": detail,
        }
    ).encode()
    start = {
        "type": "http.response.start",
        "status": 504,
        "headers": [(b"content-type", b"application/problem+json")],
    }
    return start, {"type": "http.response.body", "body": body, "more_body": False}


class DropAnswers:
    """ASGI middleware that carries out the drop a handler asked for with ``DROP_HEADER``."""

    def __init__(self, app: ASGIApp, mode: DropMode, hold_s: float) -> None:
        self.app, self.mode, self.hold_s = app, mode, hold_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        dropping = False

        async def guarded_send(message: Message) -> None:
            nonlocal dropping
            marked = _dropped(message)
            if marked is not None:
                dropping = True
                await self._drop(scope, send, lost=marked == b"lose")
            if not dropping:
                await send(message)

        await self.app(scope, receive, guarded_send)

    async def _drop(self, scope: Scope, send: Send, lost: bool) -> None:
        if self.mode == "reset" and shutdown_connection(scope):
            log.info("bank_answer_dropped", how="reset", lost=lost, path=scope.get("path"))
            return
        log.info("bank_answer_dropped", how="hold", lost=lost, hold_s=self.hold_s,
                 path=scope.get("path"))  # fmt: skip
        await asyncio.sleep(self.hold_s)
        start, body = _gateway_timeout(lost)
        await send(start)
        await send(body)
