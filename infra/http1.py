"""A small HTTP/1.1 keep-alive client on asyncio, for one ``http://host:port`` origin.

httpx spent a whole core to drive ≈400 requests/s here, and in the worker its connection pool's
bookkeeping (every pending request checks every connection for expiry with a system call) took
half the process's CPU while deposits queued for the bank. This client does only what the
benchmarks and the bank client need: JSON requests over a pool of keep-alive connections,
responses with Content-Length or chunked bodies. Not a general client.

Failures say where they happened, which is what a payment needs to know: ``NotConnected`` when
no connection could be opened (nothing was sent: a retry is harmless), any other ``HttpError``,
``OSError`` or ``TimeoutError`` once a connection existed (the request may have been processed).
An idle connection the server has closed is dropped when taken (its EOF is already known to the
event loop: no system call), and idle ones older than ``idle_max_s`` too.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit

HEAD_MAX = 64 * 1024


class HttpError(Exception):
    """The server broke the protocol or the connection (not an HTTP error status)."""


class _Unanswered(HttpError):
    """The connection closed before any byte of the response."""


class NotConnected(HttpError):
    """No connection could be opened (refused, unreachable, timed out): nothing was sent."""


# Whatever a request can fail with short of an answer (NotConnected included).
REQUEST_FAILED: tuple[type[Exception], ...] = (HttpError, OSError, TimeoutError)


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]  # lower-case names; the last of repeated headers
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")


class HttpClient:
    """Requests to one origin over at most ``connections`` keep-alive connections.

    ``resend_stale``: a request on a reused connection that closed before any byte of the
    answer is sent once more on a fresh one (for load generation). Off, that is an error like
    any other after sending (for requests whose effect must be known, unless idempotent by key).
    """

    def __init__(self, base_url: str, connections: int = 64, timeout_s: float = 30.0, *,
                 resend_stale: bool = True, idle_max_s: float = 30.0) -> None:  # fmt: skip
        parts = urlsplit(base_url)
        if parts.scheme != "http" or parts.hostname is None:
            raise ValueError(f"only http://host:port origins, got {base_url!r}")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.timeout_s = timeout_s
        self.resend_stale = resend_stale
        self.idle_max_s = idle_max_s
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []
        self._slots = asyncio.Semaphore(connections)

    async def request(
        self,
        method: str,
        path: str,
        body: object = None,
        headers: dict[str, str] | None = None,
        params: dict[str, str | int] | None = None,
    ) -> Reply:
        payload = b"" if body is None else json.dumps(body).encode()
        target = f"{path}?{urlencode(params)}" if params else path
        lines = [f"{method} {target} HTTP/1.1", f"Host: {self.host}:{self.port}",
                 f"Content-Length: {len(payload)}"]  # fmt: skip
        if body is not None:
            lines.append("Content-Type: application/json")
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        raw = ("\r\n".join(lines) + "\r\n\r\n").encode() + payload
        async with self._slots:
            for attempt in (1, 2):
                stream = self._take_idle() if attempt == 1 else None
                reused = stream is not None
                if stream is None:
                    stream = await self._connect()
                try:
                    reply, keep = await asyncio.wait_for(
                        self._exchange(stream, raw), self.timeout_s
                    )
                except _Unanswered:
                    stream[1].close()
                    if reused and self.resend_stale:
                        continue  # an idle connection the server had closed: a fresh one
                    raise
                except BaseException:
                    stream[1].close()
                    raise
                if keep:
                    self._idle.append((*stream, time.monotonic()))
                else:
                    stream[1].close()
                return reply
            raise AssertionError("unreachable")

    def _take_idle(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """The most recently used idle connection still open and young enough, if any."""
        while self._idle:
            reader, writer, since = self._idle.pop()
            if (writer.is_closing() or reader.at_eof()
                    or time.monotonic() - since > self.idle_max_s):  # fmt: skip
                writer.close()
                continue
            return reader, writer
        return None

    async def get(self, path: str, headers: dict[str, str] | None = None,
                  params: dict[str, str | int] | None = None) -> Reply:  # fmt: skip
        return await self.request("GET", path, None, headers, params)

    async def post(self, path: str, body: object, headers: dict[str, str] | None = None) -> Reply:
        return await self.request("POST", path, body, headers)

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            return await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port, limit=HEAD_MAX), self.timeout_s
            )
        except (OSError, TimeoutError) as exc:
            raise NotConnected(f"{self.host}:{self.port}: {exc!r}") from exc

    @staticmethod
    async def _exchange(
        stream: tuple[asyncio.StreamReader, asyncio.StreamWriter], raw: bytes
    ) -> tuple[Reply, bool]:
        reader, writer = stream
        try:
            writer.write(raw)
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            if not exc.partial:
                raise _Unanswered("connection closed before the response") from None
            raise HttpError(f"truncated response head: {exc!r}") from None
        except ConnectionError as exc:
            raise _Unanswered(f"connection failed: {exc!r}") from None
        except asyncio.LimitOverrunError:
            raise HttpError("response head too large") from None
        status_line, *header_lines = head[:-4].decode("latin-1").split("\r\n")
        try:
            status = int(status_line.split(" ", 2)[1])
        except (IndexError, ValueError):
            raise HttpError(f"bad status line {status_line!r}") from None
        headers = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        try:
            if headers.get("transfer-encoding", "").lower() == "chunked":
                body = await _chunked(reader)
            else:
                body = await reader.readexactly(int(headers.get("content-length", "0")))
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            raise HttpError(f"bad response body: {exc!r}") from None
        return Reply(status, headers, body), headers.get("connection", "").lower() != "close"

    async def aclose(self) -> None:
        for _, writer, _since in self._idle:
            writer.close()
        self._idle.clear()


async def _chunked(reader: asyncio.StreamReader) -> bytes:
    parts: list[bytes] = []
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
        if size == 0:
            await reader.readuntil(b"\r\n")  # no trailers expected: the blank line
            return b"".join(parts)
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)
