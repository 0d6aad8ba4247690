"""``kizo up``: start the whole system in order, watch it, and stop it in reverse order.

Order: PostgreSQL, Valkey (embedded unless DATABASE_URL / REDIS_URL name servers), migrations,
then the Kizo processes (each a ``kizo <role>`` child), each started once the one before it
answers. Ctrl-C (SIGINT) or SIGTERM stops the children newest first, then Valkey, then
PostgreSQL. If any child dies, the whole system stops with a non-zero exit: a half-running
payments system is worse than a stopped one.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import IO

import asyncpg

from engine import ensure_system_accounts
from kizo.config import Config
from kizo.devsecrets import up_env
from kizo.migrate import migrate
from kizo.servers import EmbeddedPostgres, EmbeddedValkey, port_open

CHILD_START_TIMEOUT_S = 30.0
CHILD_STOP_TIMEOUT_S = 20.0
POLL_S = 0.2


@dataclass(frozen=True)
class Child:
    """One Kizo process: ``kizo <args>``, ready when ``ready_port`` accepts connections."""

    name: str
    args: Sequence[str]
    ready_port: int | None = None
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
    """Start ``kizo <child.args>`` and wait (bounded) until it accepts connections; its output
    goes to ``log`` when given, else to the terminal."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "kizo.cli", *child.args],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        start_new_session=True,  # the supervisor, not the terminal, decides when it stops
    )
    deadline = time.monotonic() + CHILD_START_TIMEOUT_S
    while child.ready_port is not None and not port_open("127.0.0.1", child.ready_port):
        if proc.poll() is not None:
            raise RuntimeError(f"{child.name} exited with code {proc.returncode} while starting")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{child.name} did not open port {child.ready_port} in time")
        time.sleep(POLL_S)
    return proc


def stop_children(
    procs: list[tuple[Child, subprocess.Popen[bytes]]], say: Callable[[str], None] = _say
) -> None:
    for child, proc in reversed(procs):
        if proc.poll() is None:
            say(f"stopping {child.name}")
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=CHILD_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=CHILD_STOP_TIMEOUT_S)


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
            secrets_env = up_env(config)  # kizo/devsecrets.py: never a known pepper or no key
            config = start_servers(config, stack)
            applied = asyncio.run(prepare_database(config.pg_url(), config.ledger.currency))
            _say(f"migrations applied: {', '.join(applied) if applied else 'none (up to date)'}")
            env = {**os.environ, **secrets_env,
                   "DATABASE_URL": config.pg_url(), "REDIS_URL": config.valkey_url()}  # fmt: skip
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


def start_servers(config: Config, stack: ExitStack, say: Callable[[str], None] = _say) -> Config:
    """Start the embedded servers the config asks for (stopped when ``stack`` closes); returns
    the config with their URLs."""
    if config.embedded_postgres:
        pg = EmbeddedPostgres(config.pg_data_dir, config.pg_port, fsync=config.pg_fsync)
        say(f"starting PostgreSQL (data in {pg.data_dir})")
        pg.start()
        stack.callback(pg.stop)
        config = config.with_urls(pg.url(), config.redis_url)
    if config.embedded_redis:
        valkey = EmbeddedValkey(config.redis_data_dir, config.redis_port)
        say(f"starting Valkey (data in {valkey.data_dir})")
        valkey.start()
        stack.callback(valkey.stop)
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
