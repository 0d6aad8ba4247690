"""``kizo up``: start the whole system in order, watch it, and stop it in reverse order.

Order: PostgreSQL, Valkey (embedded unless DATABASE_URL / REDIS_URL name servers), migrations,
then the Kizo processes (each a ``kizo <role>`` child), each started once the one before it
serves: a server answers a query or PING, a process answers its health route with 200 (see
``kizo.readiness``). Ctrl-C (SIGINT) or SIGTERM stops the children newest first, then Valkey, then
PostgreSQL. If any child dies, the whole system stops with a non-zero exit: a half-running
payments system is worse than a stopped one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import asyncpg

from engine import ensure_system_accounts
from kizo.config import Config
from kizo.migrate import migrate
from kizo.readiness import http_probe, wait_ready
from kizo.servers import EmbeddedPostgres, EmbeddedValkey

CHILD_START_TIMEOUT_S = 30.0
CHILD_STOP_TIMEOUT_S = 20.0
POLL_S = 0.2


@dataclass(frozen=True)
class Child:
    """One Kizo process: ``kizo <args>``, started once ``health_url`` answers 200; ``url`` is
    what ``kizo up`` shows for it."""

    name: str
    args: Sequence[str]
    health_url: str
    url: str | None = None


ChildFactory = Callable[[Config], list[Child]]
# Each component registers the processes it runs under ``kizo up``, in start order.
CHILD_FACTORIES: list[ChildFactory] = []


def register_child(factory: ChildFactory) -> None:
    CHILD_FACTORIES.append(factory)


def children(config: Config) -> list[Child]:
    """The processes ``kizo up`` runs, in start order."""
    return [child for factory in CHILD_FACTORIES for child in factory(config)]


def _say(message: str) -> None:
    # A closed output (a pipe whose reader went away) must not stop the supervisor midway
    # through stopping its children: that would leave them running.
    with contextlib.suppress(BrokenPipeError):
        print(f"kizo up: {message}", flush=True)


async def prepare_database(url: str, currency: str) -> list[str]:
    conn = await asyncpg.connect(url, timeout=30)
    try:
        applied = await migrate(conn)
        await ensure_system_accounts(conn, currency)
        return applied
    finally:
        await conn.close()


def start_child(
    child: Child, env: dict[str, str], log: IO[bytes] | None = None
) -> subprocess.Popen[bytes]:
    """Start ``kizo <child.args>`` and wait (bounded) until it serves its health route; its
    output goes to ``log`` when given, else to the terminal. A child that does not serve is
    stopped, and the error names its log."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "kizo.cli", *child.args],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        start_new_session=True,  # the supervisor, not the terminal, decides when it stops
    )
    log_path = Path(log.name) if log is not None and isinstance(log.name, str) else None
    try:
        wait_ready(child.name, http_probe(child.health_url), proc=proc, log=log_path,
                   timeout_s=CHILD_START_TIMEOUT_S)  # fmt: skip
    except BaseException:
        _stop_child(proc)
        raise
    return proc


def _stop_child(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=CHILD_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=CHILD_STOP_TIMEOUT_S)


def stop_children(
    procs: list[tuple[Child, subprocess.Popen[bytes]]], say: Callable[[str], None] = _say
) -> None:
    for child, proc in reversed(procs):
        if proc.poll() is None:
            say(f"stopping {child.name}")
            _stop_child(proc)


class _Stop(Exception):
    pass


def _raise_stop(signum: int, _frame: object) -> None:
    raise _Stop(signal.Signals(signum).name)


def run_up(config: Config, *, exit_after_ready: bool = False) -> int:
    """Run the system until Ctrl-C; returns the process exit code."""
    signal.signal(signal.SIGINT, _raise_stop)
    signal.signal(signal.SIGTERM, _raise_stop)
    procs: list[tuple[Child, subprocess.Popen[bytes]]] = []
    with ExitStack() as stack:
        try:
            config = start_servers(config, stack)
            applied = asyncio.run(prepare_database(config.pg_url(), config.ledger.currency))
            _say(f"migrations applied: {', '.join(applied) if applied else 'none (up to date)'}")
            env = {**os.environ, "DATABASE_URL": config.pg_url(), "REDIS_URL": config.valkey_url()}
            for child in children(config):
                _say(f"starting {child.name}")
                procs.append((child, start_child(child, env)))
            _print_ready(config, [c for c, _ in procs])
            if exit_after_ready:
                return 0
            return _watch(procs)
        except _Stop as stop:
            _say(f"{stop} received, stopping")
            return 0
        except Exception as exc:
            _say(f"error: {exc}")
            return 1
        finally:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            stop_children(procs)
            _say("stopping servers")
    return 0


def start_servers(
    config: Config, stack: ExitStack, say: Callable[[str], None] = _say, *, scratch: bool = False
) -> Config:
    """Start the embedded servers the config asks for, each serving before this returns; they
    stop when ``stack`` closes (a server that failed to start included), and ``scratch``
    servers' data is deleted then too. Returns the config with their URLs."""
    if config.embedded_postgres:
        pg = EmbeddedPostgres(config.pg_data_dir, config.pg_port, fsync=config.pg_fsync)
        if scratch:
            stack.callback(pg.remove_data)
        stack.callback(pg.stop)
        say(f"starting PostgreSQL (data in {pg.data_dir})")
        pg.start()
        config = config.with_urls(pg.url(), config.redis_url)
    if config.embedded_redis:
        valkey = EmbeddedValkey(config.redis_data_dir, config.redis_port)
        stack.callback(valkey.stop)
        say(f"starting Valkey (data in {valkey.data_dir})")
        valkey.start()
        config = config.with_urls(config.pg_url(), valkey.url())
    return config


def _redact(url: str) -> str:
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}" if ":" in creds else url


def _print_ready(config: Config, started: list[Child]) -> None:
    lines = [
        "ready",
        f"  PostgreSQL  {_redact(config.pg_url())}",
        f"  Redis       {_redact(config.valkey_url())}",
    ]
    lines += [f"  {c.name:<11} {c.url}" for c in started if c.url]
    lines.append("  Ctrl-C stops everything")
    _say("\n".join(lines))


def _watch(procs: list[tuple[Child, subprocess.Popen[bytes]]]) -> int:
    while True:
        for child, proc in procs:
            code = proc.poll()
            if code is not None:
                _say(f"{child.name} exited with code {code}; stopping everything")
                return 1
        time.sleep(POLL_S)
