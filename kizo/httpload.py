"""A small HTTP/1.1 keep-alive client for load generation on asyncio.

Benchmarks share the machine's two cores with the system they measure, so the load generator
must be cheap: httpx spent a whole core to drive ≈400 requests/s here. This client does only
what a load generator needs: JSON requests over a pool of keep-alive connections to one
``http://host:port``, responses with Content-Length or chunked bodies. Not a general client.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

HEAD_MAX = 64 * 1024


class HttpError(Exception):
    """The server broke the protocol or the connection (not an HTTP error status)."""


class _Unanswered(HttpError):
    """The connection closed before any byte of the response."""


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]  # lower-case names; the last of repeated headers
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class LoadClient:
    """Requests to one origin over at most ``connections`` keep-alive connections."""

    def __init__(self, base_url: str, connections: int = 64, timeout_s: float = 30.0) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "http" or parts.hostname is None:
            raise ValueError(f"only http://host:port origins, got {base_url!r}")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.timeout_s = timeout_s
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._slots = asyncio.Semaphore(connections)

    async def request(
        self,
        method: str,
        path: str,
        body: object = None,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        payload = b"" if body is None else json.dumps(body).encode()
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}",
                 f"Content-Length: {len(payload)}"]  # fmt: skip
        if body is not None:
            lines.append("Content-Type: application/json")
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        raw = ("\r\n".join(lines) + "\r\n\r\n").encode() + payload
        async with self._slots:
            for attempt in (1, 2):
                reused = attempt == 1 and bool(self._idle)
                stream = self._idle.pop() if reused else await self._connect()
                try:
                    reply, keep = await asyncio.wait_for(
                        self._exchange(stream, raw), self.timeout_s
                    )
                except _Unanswered:
                    stream[1].close()
                    if reused:
                        continue  # an idle connection the server had closed: a fresh one
                    raise
                except BaseException:
                    stream[1].close()
                    raise
                if keep:
                    self._idle.append(stream)
                else:
                    stream[1].close()
                return reply
            raise AssertionError("unreachable")

    async def get(self, path: str, headers: dict[str, str] | None = None) -> Reply:
        return await self.request("GET", path, None, headers)

    async def post(self, path: str, body: object, headers: dict[str, str] | None = None) -> Reply:
        return await self.request("POST", path, body, headers)

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port, limit=HEAD_MAX), self.timeout_s
        )

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
        for _, writer in self._idle:
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
