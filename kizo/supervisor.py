"""``kizo up``: start the whole system in order, watch it, and stop it in reverse order.

Order: PostgreSQL, Valkey (embedded unless DATABASE_URL / REDIS_URL name servers), migrations,
then the Kizo processes (each a ``kizo <role>`` child, see ``infra.processes.children``), each
started once the one before it serves. Ctrl-C (SIGINT) or SIGTERM stops the children newest
first, then Valkey, then PostgreSQL. If any child dies, the whole system stops with a non-zero
exit: a half-running payments system is worse than a stopped one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

from infra import prometheus
from infra.addresses import AddressInUse, ensure_free
from infra.commands import Command
from infra.config import Config
from infra.devsecrets import up_env
from infra.metrics import remove_targets, targets_dir, write_targets
from infra.processes import (
    POLL_S,
    Child,
    children,
    metrics_targets,
    prepare_database,
    say_up,
    start_child,
    start_servers,
    stop_children,
)
from infra.readiness import NotReady
from infra.servers import ServerError

# The fault proxy's shipped file (chaos.proxy.server.PROXIES_FILE, named, not imported).
PROXIES_FILE = Path(__file__).resolve().parents[1] / "toxiproxy" / "toxiproxy.json"


class _Stop(Exception):
    pass


def _raise_stop(signum: int, _frame: object) -> None:
    raise _Stop(signal.Signals(signum).name)


def run_up(config: Config, *, exit_after_ready: bool = False) -> int:
    """Run the system until Ctrl-C; returns the process exit code."""
    signal.signal(signal.SIGINT, _raise_stop)
    signal.signal(signal.SIGTERM, _raise_stop)
    procs: list[tuple[Child, subprocess.Popen[bytes]]] = []
    targets = targets_dir(config.home) / "up.json"
    with ExitStack() as stack:
        stack.callback(remove_targets, targets)
        try:
            _check_addresses(config)  # every address up front: a taken one starts nothing
            secrets_env = up_env(config)  # infra/devsecrets.py: never a known pepper or no key
            config = start_servers(config, stack)
            applied = asyncio.run(prepare_database(config.pg_url(), config.ledger.currency))
            say_up(f"migrations applied: {', '.join(applied) if applied else 'none (up to date)'}")
            env = {**os.environ, **secrets_env,
                   "DATABASE_URL": config.pg_url(), "REDIS_URL": config.valkey_url()}  # fmt: skip
            for child in children(config):
                say_up(f"starting {child.name}")
                procs.append((child, start_child(child, env)))
            # Prometheus finds every child through this file (file_sd), removed at the end.
            write_targets(targets, metrics_targets([c for c, _ in procs]), "up")
            prometheus_url = _start_prometheus(config, stack)
            _print_ready(config, [c for c, _ in procs], prometheus_url)
            if exit_after_ready:
                return 0
            return _watch(procs)
        except _Stop as stop:
            say_up(f"{stop} received, stopping")
            return 0
        except AddressInUse as exc:
            print(f"kizo up: {exc}", file=sys.stderr)
            return 2
        except Exception as exc:
            say_up(f"error: {exc}")
            return 1
        finally:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            stop_children(procs)
            say_up("stopping servers")
    return 0


def _addresses(config: Config) -> list[tuple[str, int, str]]:
    """(host, port, the setting that moves it) of everything ``kizo up`` binds except the
    embedded servers, which check their own after stopping a leftover of their data dir."""
    host, p = config.host, config.pipeline
    wanted = [(host, config.proxy_api_port, "KIZO_PROXY_API_PORT"),
              (host, config.bank_port, "KIZO_BANK_PORT"),
              *((host, p.worker_metrics_port + i, "KIZO_WORKER_METRICS_PORT")
                for i in range(config.workers)),
              (host, p.janitor_metrics_port, "KIZO_JANITOR_METRICS_PORT"),
              (host, config.api_port, "KIZO_API_PORT")]  # fmt: skip
    wanted += [(h, port, "KIZO_PROXY_FILE") for h, port in _proxy_listens(config)]
    if config.prometheus_port and prometheus.binary("prometheus") is not None:
        wanted.append((host, config.prometheus_port, "KIZO_PROMETHEUS_PORT (0: none)"))
    return wanted


def _proxy_listens(config: Config) -> list[tuple[str, int]]:
    """The listen addresses of the fault proxy's file, read as plain JSON (the supervisor never
    loads the harness); a file it cannot read is the proxy's to report."""
    if config.proxy_file.lower() == "none":
        return []
    path = Path(config.proxy_file) if config.proxy_file else PROXIES_FILE
    try:
        specs = json.loads(path.read_text())
        listens = [str(s["listen"]) for s in specs if s.get("enabled", True)]
        return [(h or "0.0.0.0", int(port)) for h, _, port in (a.rpartition(":") for a in listens)]  # noqa: S104
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return []


def _check_addresses(config: Config) -> None:
    for host, port, variable in _addresses(config):
        ensure_free(host, port, variable)


def _redact(url: str) -> str:
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}" if ":" in creds else url


def _start_prometheus(config: Config, stack: ExitStack) -> str:
    """Prometheus over the children's targets and the rules, when its binary is here (``make``
    unpacks one) and ``KIZO_PROMETHEUS_PORT`` is not 0; its URL, or "" without one. Optional:
    a port taken or a binary missing is said, and the system runs on without it."""
    if config.prometheus_port == 0:
        return ""
    if prometheus.binary("prometheus") is None:
        say_up("no prometheus binary (make run unpacks one): metrics are served, not stored")
        return ""
    server = prometheus.Prometheus(config.home, config.prometheus_port, config.host)
    try:
        server.start()
    except (ServerError, NotReady) as exc:
        say_up(f"Prometheus not started: {exc}")
        return ""
    stack.callback(server.stop)
    return server.url


def _print_ready(config: Config, started: list[Child], prometheus_url: str) -> None:
    lines = [
        "ready",
        f"  PostgreSQL  {_redact(config.pg_url())}",
        f"  Redis       {_redact(config.valkey_url())}",
    ]
    lines += [f"  {c.name:<11} {c.url}" for c in started if c.url]
    lines += _pages(f"http://{config.host}:{config.api_port}")
    lines.append(f"  metrics     {targets_dir(config.home) / 'up.json'} (Prometheus file_sd)")
    if prometheus_url:
        lines += [
            f"  {'prometheus':<11} {prometheus_url} (rules: observability/rules)",
            "  incident    kizo incident --since 15m  (the incident view as a PNG)",
        ]
    lines.append("  Ctrl-C stops everything")
    say_up("\n".join(lines))


def _pages(base: str) -> list[str]:
    """Where a person starts: the pages the API serves, and how to see the console."""
    return [
        f"  {'wallet':<11} {base}/app  (sign up, deposit, pay someone, watch it settle)",
        f"  {'console':<11} {base}/app/console  (admins: kizo admin create EMAIL)",
        f"  {'API docs':<11} {base}/docs  (OpenAPI: {base}/openapi.json)",
        f"  {'landing':<11} {base}/",
    ]


def _watch(procs: list[tuple[Child, subprocess.Popen[bytes]]]) -> int:
    while True:
        for child, proc in procs:
            code = proc.poll()
            if code is not None:
                say_up(f"{child.name} exited with code {code}; stopping everything")
                return 1
        time.sleep(POLL_S)


def _up(config: Config, args: argparse.Namespace) -> int:
    return run_up(config, exit_after_ready=bool(args.exit_after_ready))


def _configure_up(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--exit-after-ready",
        action="store_true",
        help="start everything, print the ready line, then stop (a smoke test)",
    )


COMMANDS = [Command("up", _up, _configure_up)]
