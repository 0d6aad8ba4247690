"""A whole Kizo system on scratch servers: the processes of ``kizo up`` (bank, workers, janitor,
API) on an embedded PostgreSQL and Valkey of their own, on free ports, in a temporary home that
is removed afterwards. Benchmarks and the bank workload run against it, so they measure the real
thing and never touch the developer's ``.kizo`` data.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from infra.config import Config
from infra.devsecrets import scratch_env
from infra.ports import reserve_ports
from infra.processes import (
    Child,
    children,
    prepare_database,
    spawn_child,
    start_child,
    start_servers,
    stop_children,
    wait_child,
)
from infra.servers import EmbeddedPostgres, EmbeddedValkey

LOG_TAIL_LINES = 15
# Processes that never go through the fault proxy: the proxy itself, and the bank (the outside
# world, with its own database).
DIRECT_CHILDREN = frozenset({"proxy", "bank"})
# Behind the proxy, each process role reaches each service it uses through a proxy of its own
# (a link), so that a fault can hit exactly one: ``<service>_<role>``. The API never calls the
# bank. Link name -> (service, role).
LINKS: dict[str, tuple[str, str]] = {
    f"{service}_{role}": (service, role)
    for service, roles in (("postgres", ("api", "worker", "janitor")),
                           ("redis", ("api", "worker", "janitor")),
                           ("bank", ("worker", "janitor")))
    for role in roles
}  # fmt: skip
# The names of earlier builds (one proxy per service), kept for scenario files and clients:
# each stands for every link of its service.
LINK_ALIASES: dict[str, tuple[str, ...]] = {
    service: tuple(link for link, (s, _role) in LINKS.items() if s == service)
    for service in ("postgres", "redis", "bank")
}


def links_of(name: str) -> tuple[str, ...]:
    """The links a proxy name stands for: itself, or every link of an alias's service."""
    if name in LINKS:
        return (name,)
    return LINK_ALIASES[name]


PORT_VARIABLES = (
    "KIZO_PG_PORT",
    "KIZO_REDIS_PORT",
    "KIZO_API_PORT",
    "KIZO_BANK_PORT",
    "KIZO_JANITOR_METRICS_PORT",
    "KIZO_WORKER_METRICS_PORT",
    "KIZO_PROXY_API_PORT",
)


@dataclass(frozen=True)
class System:
    config: Config
    env: dict[str, str]
    api_url: str  # http://host:port, the REST API under /api/v1
    bank_url: str
    procs: list[tuple[Child, subprocess.Popen[bytes]]]
    proxy_url: str = ""  # the fault proxy's HTTP API
    control: ProcessControl | None = None

    @property
    def database_url(self) -> str:
        return self.config.pg_url()

    @property
    def redis_url(self) -> str:
        return self.config.valkey_url()


class ProcessControl:
    """Crash, pause and restart the system's processes by name (chaos scenarios), and its
    embedded servers (postgres, valkey: crash and restart only)."""

    def __init__(self, procs: list[tuple[Child, subprocess.Popen[bytes]]],
                 envs: dict[str, dict[str, str]], logs: Path,
                 servers: Mapping[str, EmbeddedPostgres | EmbeddedValkey] | None = None,
                 ) -> None:  # fmt: skip
        self.procs = procs  # the list the system stops at exit: restarts land in it
        self.envs = envs
        self.logs = logs
        self.servers = dict(servers or {})

    def names(self) -> list[str]:
        return [child.name for child, _ in self.procs] + sorted(self.servers)

    def pause(self, name: str) -> None:
        """SIGSTOP the process and its own children: alive, holding its connections and jobs,
        doing nothing (a process stuck in a long GC pause or a frozen VM)."""
        self._signal(name, signal.SIGSTOP)

    def resume(self, name: str) -> None:
        self._signal(name, signal.SIGCONT)

    def _signal(self, name: str, sig: int) -> None:
        if name in self.servers:
            raise KeyError(f"{name} can only be killed and restarted")
        _child, proc = self.procs[self._index(name)]
        os.killpg(proc.pid, sig)

    def _index(self, name: str) -> int:
        for i, (child, _) in enumerate(self.procs):
            if child.name == name:
                return i
        raise KeyError(f"no process {name!r} (there are {', '.join(self.names())})")

    def kill(self, name: str) -> None:
        """SIGKILL the process and its own children (it leads its process group)."""
        if name in self.servers:
            self.servers[name].kill()
            return
        _child, proc = self.procs[self._index(name)]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def respawn(self, name: str, lose_data: bool = False) -> None:
        """Start a killed process again, without waiting: call it from the main thread (see
        ``infra.processes.spawn_child``), then ``wait_started`` from any thread. A server starts
        here, serving when this returns; ``lose_data`` (valkey only) starts it empty."""
        if name in self.servers:
            self._restart_server(name, lose_data)
            return
        if lose_data:
            raise RuntimeError(f"only valkey restarts without its data, not {name}")
        index = self._index(name)
        child, old = self.procs[index]
        if old.poll() is None:
            raise RuntimeError(f"{name} is still running")
        with (self.logs / f"{child.name}.log").open("ab") as log:
            self.procs[index] = (child, spawn_child(child, self.envs[name], log))

    def _restart_server(self, name: str, lose_data: bool) -> None:
        server = self.servers[name]
        if server.running:
            raise RuntimeError(f"{name} is still running")
        if lose_data:
            if not isinstance(server, EmbeddedValkey):
                raise RuntimeError(f"only valkey restarts without its data, not {name}")
            server.remove_data()
        server.start()

    def wait_started(self, name: str) -> None:
        if name in self.servers:
            return  # started by ``respawn``
        child, proc = self.procs[self._index(name)]
        wait_child(child, proc, self.logs / f"{child.name}.log")


def _quiet(_message: str) -> None:
    pass


WORKERS_PORTS = 64  # KIZO_WORKERS' bound: worker i serves /metrics on the base port + i


def _scratch_ports(stack: ExitStack) -> dict[str, str]:
    """A port for each server, and for the workers' metrics a run of ports, each claimed in
    ``infra.ports`` until ``stack`` closes (after the servers stop: a crashed server restarts
    on its own port, which no other picker can take meanwhile)."""
    ports = {name: stack.enter_context(reserve_ports(1)) for name in PORT_VARIABLES
             if name != "KIZO_WORKER_METRICS_PORT"}  # fmt: skip
    base = stack.enter_context(reserve_ports(WORKERS_PORTS))
    return {**{k: str(v) for k, v in ports.items()}, "KIZO_WORKER_METRICS_PORT": str(base)}


@contextmanager
def scratch_system(
    overrides: Mapping[str, str] | None = None, behind_proxy: bool = False
) -> Iterator[System]:
    """Start the system; stop every process and server, and delete the data, on exit. KIZO_*
    ``overrides`` tune it (shards, workers, rate limits…). ``behind_proxy``: the API, workers
    and janitor reach PostgreSQL, Redis and the bank through the fault proxy, each role through
    proxies of its own (``LINKS``: postgres_api, redis_worker, bank_janitor, …; the bank and the
    readers of the final state go direct). If the
    body fails, the tail of each process's log is printed to stderr."""
    with tempfile.TemporaryDirectory(prefix="kizo-system-") as home, ExitStack() as stack:
        env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "REDIS_URL"}}
        env |= {
            "KIZO_HOME": home,
            **_scratch_ports(stack),
            "KIZO_PROXY_FILE": "none",  # its proxies' fixed ports could clash; add them by API
            **scratch_env(Path(home)),  # its own secrets; the marker that allows KIZO_MUTATION
            **(overrides or {}),
        }
        # The stack stops what started, and the temporary home goes, even when a start fails.
        servers: dict[str, EmbeddedPostgres | EmbeddedValkey] = {}
        config = start_servers(Config.from_env(env), stack, say=_quiet, scratch=True,
                               started=servers, pick_port=lambda: stack.enter_context(
                                   reserve_ports(1)))  # fmt: skip
        asyncio.run(prepare_database(config.pg_url(), config.ledger.currency))
        env |= {
            "DATABASE_URL": config.pg_url(),
            "REDIS_URL": config.valkey_url(),
            # A server started again on a new pick (a taken port) moved: say where.
            "KIZO_PG_PORT": str(config.pg_port),
            "KIZO_REDIS_PORT": str(config.redis_port),
        }
        logs = Path(home) / "logs"
        logs.mkdir()
        procs: list[tuple[Child, subprocess.Popen[bytes]]] = []
        stack.callback(stop_children, procs, _quiet)
        envs = _start_children(config, env, procs, logs, stack, behind_proxy)
        system = System(
            config,
            env,
            f"http://{config.host}:{config.api_port}",
            f"http://{config.host}:{config.bank_port}",
            procs,
            f"http://{config.host}:{config.proxy_api_port}",
            ProcessControl(procs, envs, logs, servers),
        )
        try:
            yield system
        except BaseException:
            _print_log_tails(logs)
            raise


def _start_children(
    config: Config,
    env: dict[str, str],
    procs: list[tuple[Child, subprocess.Popen[bytes]]],
    logs: Path,
    stack: ExitStack,
    behind_proxy: bool,
) -> dict[str, dict[str, str]]:
    """Start each child once the one before it serves; returns each one's environment."""
    role_envs: dict[str, dict[str, str]] = {}
    envs: dict[str, dict[str, str]] = {}
    for child in children(config):
        log = stack.enter_context((logs / f"{child.name}.log").open("wb"))
        direct = child.name in DIRECT_CHILDREN
        envs[child.name] = env if direct else env | role_envs.get(child.role, {})
        procs.append((child, start_child(child, envs[child.name], log)))
        if child.name == "proxy" and behind_proxy:
            role_envs = _through_proxies(config)
    return envs


def _through_proxies(config: Config) -> dict[str, dict[str, str]]:
    """Create a proxy per link (``LINKS``); the environment of each role that sends its
    processes through its own links, so that a scenario can cut or slow exactly one role's way
    to one service (the janitor from the bank, the workers from PostgreSQL) and leave the rest."""
    host, upstreams = config.host, config.proxied_services()
    # Port 0: the proxy binds each link itself, so no port is picked free here and bound
    # later (the servers' ports are chosen but not all bound yet: a pick could take one).
    body = [{"name": link, "listen": f"{host}:0", "upstream": upstreams[service]}
            for link, (service, _role) in LINKS.items()]  # fmt: skip
    api = f"http://{host}:{config.proxy_api_port}"
    httpx.post(f"{api}/populate", json=body, timeout=10).raise_for_status()
    made = httpx.get(f"{api}/proxies", timeout=10).raise_for_status().json()
    listen = {link: int(made[link]["listen"].rsplit(":", 1)[1]) for link in LINKS}
    urls = {
        "postgres": lambda port: f"postgresql://postgres@{host}:{port}/kizo",
        "redis": lambda port: f"redis://{host}:{port}/0",
        "bank": lambda port: f"http://{host}:{port}",
    }
    variables = {"postgres": "DATABASE_URL", "redis": "REDIS_URL", "bank": "KIZO_BANK_URL"}
    envs: dict[str, dict[str, str]] = {}
    for link, (service, role) in LINKS.items():
        envs.setdefault(role, {})[variables[service]] = urls[service](listen[link])
    return envs


def _print_log_tails(logs: Path) -> None:
    for path in sorted(logs.glob("*.log")):
        lines = path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        if lines:
            print(f"--- {path.stem} (last {len(lines)} lines)", file=sys.stderr)
            print("\n".join(lines), file=sys.stderr)
