"""Readiness: a server or process counts as started only when it serves, not when its port opens.

PostgreSQL accepts TCP a few milliseconds before it accepts sessions ("the database system is
starting up"), and an HTTP server binds before its app can answer: an open port proves nothing.
So every start in Kizo (``kizo up``, scratch systems, test fixtures) waits here, through one
loop, until a probe gets a real answer: a query, a PING, a 200 from a health route. The wait is
bounded, and a failure is one line naming the log, followed by the log's last lines.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import redis

from infra.ports import reported_port

READY_TIMEOUT_S = 30.0
READY_POLL_S = 0.05
PROBE_TIMEOUT_S = 2.0
LOG_TAIL_LINES = 12

# Answers None when the thing serves, else why not yet (the last reason goes in the error).
Probe = Callable[[], str | None]


class NotReady(RuntimeError):
    """A server or process did not serve within its bound, or exited while starting."""


def log_tail(log: Path | None, lines: int = LOG_TAIL_LINES) -> str:
    if log is None or not log.exists():
        return ""
    tail = log.read_text(errors="replace").splitlines()[-lines:]
    return "\n".join(f"    {line}" for line in tail)


def _failure(headline: str, log: Path | None) -> NotReady:
    where = f"; log: {log}" if log is not None else "; its output is above"
    tail = log_tail(log)
    return NotReady(headline + where + (f"\n  last log lines:\n{tail}" if tail else ""))


def wait_ready(
    name: str,
    probe: Probe,
    *,
    proc: subprocess.Popen[bytes] | None = None,
    log: Path | None = None,
    timeout_s: float = READY_TIMEOUT_S,
) -> None:
    """Return once ``probe`` answers None; raise ``NotReady`` naming ``log`` if ``proc`` exits
    first or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    reason = "no answer yet"
    while True:
        if proc is not None and proc.poll() is not None:
            raise _failure(f"{name} exited with code {proc.returncode} while starting", log)
        answer = probe()
        if answer is None:
            return
        reason = answer
        if time.monotonic() >= deadline:
            raise _failure(f"{name} did not serve within {timeout_s:g}s ({reason})", log)
        time.sleep(READY_POLL_S)


def http_probe(url: str) -> Probe:
    """Serving means ``GET url`` answers 200."""

    def probe() -> str | None:
        try:
            status = httpx.get(url, timeout=PROBE_TIMEOUT_S).status_code
        except httpx.HTTPError as exc:
            return f"GET {url}: {exc.__class__.__name__}"
        return None if status == 200 else f"GET {url} answered {status}"

    return probe


def redis_probe(host: str, port: int) -> Probe:
    """Serving means PING answers PONG."""

    def probe() -> str | None:
        client = redis.Redis(
            host=host, port=port, socket_timeout=PROBE_TIMEOUT_S,
            socket_connect_timeout=PROBE_TIMEOUT_S,
        )  # fmt: skip
        try:
            return None if client.ping() else "PING answered no"
        except redis.RedisError as exc:
            return f"PING: {exc}"
        finally:
            client.close()

    return probe


def postgres_probe(psql: Path, host: str, port: int) -> Probe:
    """Serving means a session opens and ``SELECT 1`` answers 1 (a server still starting up
    accepts TCP and then refuses the session)."""
    args = [str(psql), "-h", host, "-p", str(port), "-U", "postgres", "-d", "postgres",
            "-XtAc", "SELECT 1"]  # fmt: skip
    env = {**os.environ, "PGCONNECT_TIMEOUT": str(int(PROBE_TIMEOUT_S))}

    def probe() -> str | None:
        try:
            done = subprocess.run(
                args, capture_output=True, text=True, env=env, timeout=PROBE_TIMEOUT_S * 2
            )
        except subprocess.TimeoutExpired:
            return "SELECT 1 timed out"
        if done.returncode == 0 and done.stdout.strip() == "1":
            return None
        lines = done.stderr.strip().splitlines()
        return lines[-1] if lines else f"psql exited with code {done.returncode}"

    return probe


def wait_reported_port(
    run_dir: Path,
    name: str,
    *,
    proc: subprocess.Popen[bytes] | None = None,
    log: Path | None = None,
    timeout_s: float = READY_TIMEOUT_S,
) -> int:
    """The port a child that bound port 0 reported (``infra.ports.report_port``), once it has;
    the same bounded loop, so a child that exits first is named with its log."""
    found: list[int] = []

    def probe() -> str | None:
        port = reported_port(run_dir, name)
        if port is None:
            return f"no {name}.port in {run_dir} yet"
        found.append(port)
        return None

    wait_ready(f"{name} (its port)", probe, proc=proc, log=log, timeout_s=timeout_s)
    return found[-1]


def wait_http(
    url: str,
    *,
    proc: subprocess.Popen[bytes] | None = None,
    log: Path | None = None,
    timeout_s: float = READY_TIMEOUT_S,
) -> None:
    """Wait until ``url`` answers 200 (for processes started by hand: tests, benchmarks)."""
    wait_ready(url, http_probe(url), proc=proc, log=log, timeout_s=timeout_s)
