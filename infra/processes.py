"""The processes of a Kizo system and the servers under them: which ``kizo <role>`` children
run, in what order, how one is started (and counted as started), and how they stop. ``kizo up``
(kizo.supervisor) and the scratch systems of tests, benches and the chaos harness
(infra.system) both start the system through these functions.
"""

from __future__ import annotations

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
from infra.config import Config
from infra.migrate import migrate
from infra.servers import EmbeddedPostgres, EmbeddedValkey, port_open

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


def children(config: Config) -> list[Child]:
    """The processes ``kizo up`` runs, in start order: the fault proxy first (scenarios put it
    in front of the others), the bank (workers and the janitor call it), the workers, the
    janitor, and the API last, once everything it hands work to is up. Named here as command
    lines, not imported, so the supervisor never loads the code its children run."""
    host = config.host
    workers = config.workers
    return [
        Child("proxy", ["proxy"], ready_port=config.proxy_api_port,
              url=f"http://{host}:{config.proxy_api_port}"),
        Child("bank", ["bank"], ready_port=config.bank_port,
              url=f"http://{host}:{config.bank_port}"),
        *(Child(f"worker-{i}", ["worker", "--index", str(i), "--of", str(workers)])
          for i in range(workers)),
        Child("janitor", ["janitor"],
              url=f"http://{host}:{config.pipeline.janitor_metrics_port}/metrics"),
        Child("api", ["api"], ready_port=config.api_port,
              url=f"http://{host}:{config.api_port}/api/v1"),
    ]  # fmt: skip


def say_up(message: str) -> None:
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
    procs: list[tuple[Child, subprocess.Popen[bytes]]], say: Callable[[str], None] = say_up
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


def start_servers(config: Config, stack: ExitStack, say: Callable[[str], None] = say_up) -> Config:
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
