"""The processes of a Kizo system and the servers under them: which ``kizo <role>`` children
run, in what order, how one is started (and counted as started), and how they stop. ``kizo up``
(kizo.supervisor) and the scratch systems of tests, benches and the chaos harness
(infra.system) both start the system through these functions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TypeVar

import asyncpg

from engine import ensure_system_accounts
from infra.addresses import AddressInUse
from infra.config import Config
from infra.metrics import Target
from infra.migrate import migrate
from infra.ports import bindable
from infra.readiness import NotReady, http_probe, wait_ready
from infra.servers import (
    EmbeddedPostgres,
    EmbeddedValkey,
    ServerError,
    die_with_parent,
    stop_process,
)

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
    metrics: str = ""  # host:port of its /metrics, for Prometheus (infra.metrics file_sd)

    @property
    def role(self) -> str:
        return self.name.split("-", 1)[0]


def children(config: Config) -> list[Child]:
    """The processes ``kizo up`` runs, in start order: the fault proxy first (scenarios put it
    in front of the others), the bank (workers and the janitor call it), the workers, the
    janitor, and the API last, once everything it hands work to is up. Named here as command
    lines, not imported, so the supervisor never loads the code its children run."""
    host, workers = config.host, config.workers
    proxy = f"http://{host}:{config.proxy_api_port}"
    bank = f"http://{host}:{config.bank_port}"
    janitor = f"http://{host}:{config.pipeline.janitor_metrics_port}/metrics"
    api = f"http://{host}:{config.api_port}"
    return [
        # Toxiproxy's API has no health route; its version answers once it serves.
        Child("proxy", ["proxy"], f"{proxy}/version", proxy, f"{host}:{config.proxy_api_port}"),
        Child("bank", ["bank"], f"{bank}/health", bank, f"{host}:{config.bank_port}"),
        # Each worker serves its metrics on a port of its own: the base plus its index.
        *(_worker(host, i, workers, config.pipeline.worker_metrics_port + i,
                  config.pipeline.worker_leases) for i in range(workers)),
        Child("janitor", ["janitor"], janitor, janitor,
              f"{host}:{config.pipeline.janitor_metrics_port}"),
        Child("api", ["api"], f"{api}/health", f"{api}/api/v1", f"{host}:{config.api_port}"),
    ]  # fmt: skip


def metrics_targets(started: Sequence[Child]) -> list[Target]:
    """What Prometheus should scrape of these children (see docs/observability.md)."""
    return [Target(c.role, c.name, c.metrics) for c in started if c.metrics]


def _worker(host: str, index: int, of: int, port: int, leases: bool) -> Child:
    shards = ["--lease"] if leases else ["--index", str(index), "--of", str(of)]
    args = ["worker", *shards, "--metrics-port", str(port)]
    metrics = f"http://{host}:{port}/metrics"
    return Child(f"worker-{index}", args, metrics, metrics, f"{host}:{port}")


def say_up(message: str) -> None:
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


def spawn_child(
    child: Child, env: dict[str, str], log: IO[bytes] | None = None
) -> subprocess.Popen[bytes]:
    """Start ``kizo <child.args>`` without waiting for it; its output goes to ``log`` when
    given, else to the terminal. The kernel sends the child SIGTERM when the thread that spawned
    it ends (``PR_SET_PDEATHSIG``), so a supervisor killed outright (SIGKILL, the OOM killer)
    leaves no worker running on without it. Hence: spawn from a thread that lives as long as
    the system does, the main one, and wait for readiness anywhere (``wait_child``)."""
    return subprocess.Popen(
        [sys.executable, "-m", "kizo.cli", *child.args],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        # Its own session: the supervisor, not the terminal's Ctrl-C, decides when it stops.
        preexec_fn=die_with_parent(signal.SIGTERM),
    )


def wait_child(child: Child, proc: subprocess.Popen[bytes], log: Path | None = None) -> None:
    """Wait (bounded) until the child serves its health route; one that does not is stopped,
    and the error names its log."""
    try:
        wait_ready(child.name, http_probe(child.health_url), proc=proc, log=log,
                   timeout_s=CHILD_START_TIMEOUT_S)  # fmt: skip
    except BaseException:
        _stop_child(proc)
        raise


def start_child(
    child: Child, env: dict[str, str], log: IO[bytes] | None = None
) -> subprocess.Popen[bytes]:
    """``spawn_child``, then ``wait_child``: the child serves when this returns."""
    proc = spawn_child(child, env, log)
    wait_child(
        child, proc, Path(log.name) if log is not None and isinstance(log.name, str) else None
    )
    return proc


def _stop_child(proc: subprocess.Popen[bytes]) -> None:
    stop_process(proc, signal.SIGTERM, CHILD_STOP_TIMEOUT_S)


def stop_children(
    procs: list[tuple[Child, subprocess.Popen[bytes]]], say: Callable[[str], None] = say_up
) -> None:
    for child, proc in reversed(procs):
        if proc.poll() is None:
            say(f"stopping {child.name}")
            _stop_child(proc)


SERVER_START_ATTEMPTS_MAX = 3  # a picked port someone outside infra.ports took: pick again


def start_servers(
    config: Config,
    stack: ExitStack,
    say: Callable[[str], None] = say_up,
    *,
    scratch: bool = False,
    started: dict[str, EmbeddedPostgres | EmbeddedValkey] | None = None,
    pick_port: Callable[[], int] | None = None,
) -> Config:
    """Start the embedded servers the config asks for, each serving before this returns; they
    stop when ``stack`` closes (a server that failed to start included), and ``scratch``
    servers' data is deleted then too. Returns the config with their URLs; ``started`` gets
    the servers by name (postgres, valkey), for chaos scenarios that crash them. With
    ``pick_port``, a server whose port turns out taken starts again on a new pick (bounded)."""
    if config.embedded_postgres:

        def postgres(port: int) -> EmbeddedPostgres:
            pg = EmbeddedPostgres(config.pg_data_dir, port, fsync=config.pg_fsync)
            if scratch:
                stack.callback(pg.remove_data)
            stack.callback(pg.stop)
            say(f"starting PostgreSQL (data in {pg.data_dir})")
            return pg

        pg = _start_on_a_port(postgres, config.pg_port, "KIZO_PG_PORT", pick_port)
        if started is not None:
            started["postgres"] = pg
        config = dataclasses.replace(config.with_urls(pg.url(), config.redis_url), pg_port=pg.port)
    if config.embedded_redis:

        def valkey(port: int) -> EmbeddedValkey:
            server = EmbeddedValkey(config.redis_data_dir, port)
            stack.callback(server.stop)
            say(f"starting Valkey (data in {server.data_dir})")
            return server

        redis = _start_on_a_port(valkey, config.redis_port, "KIZO_REDIS_PORT", pick_port)
        if started is not None:
            started["valkey"] = redis
        config = dataclasses.replace(config.with_urls(config.pg_url(), redis.url()),
                                     redis_port=redis.port)  # fmt: skip
    return config


_Server = TypeVar("_Server", EmbeddedPostgres, EmbeddedValkey)


def _start_on_a_port(
    make: Callable[[int], _Server], port: int, variable: str,
    pick_port: Callable[[], int] | None,
) -> _Server:  # fmt: skip
    """``make(port).start()``; again on a fresh pick while the failure was a taken port. Out
    of picks (or without them), a taken port is ``AddressInUse`` naming ``variable``."""
    for attempt in range(1, SERVER_START_ATTEMPTS_MAX + 1):
        server = make(port)
        try:
            server.start()
            return server
        except AddressInUse as exc:
            if pick_port is None or attempt == SERVER_START_ATTEMPTS_MAX:
                raise exc.for_variable(variable) from None
        except (ServerError, NotReady):
            # Lost the port between the check and the server's own bind.
            taken = not bindable(server.host, port)
            if pick_port is None or not taken or attempt == SERVER_START_ATTEMPTS_MAX:
                raise
        server.stop()
        port = pick_port()
    raise AssertionError("unreachable: the last attempt returns or raises")
