"""A taken address is one line naming it, its holder and the setting that moves it; exit 2.

Each case binds the address itself (this test process is the holder the line must name) and
starts the command as a real subprocess, on ports of its own for everything else."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra import prometheus
from infra.servers import free_port

ROOT = Path(__file__).resolve().parents[1]
COMMAND_TIMEOUT_S = 120  # kizo up runs initdb before it finds PostgreSQL's port taken
UP_PORTS = ("KIZO_PG_PORT", "KIZO_REDIS_PORT", "KIZO_API_PORT", "KIZO_BANK_PORT",
            "KIZO_JANITOR_METRICS_PORT", "KIZO_WORKER_METRICS_PORT", "KIZO_PROXY_API_PORT",
            "KIZO_PROMETHEUS_PORT")  # fmt: skip


@contextlib.contextmanager
def _held() -> Iterator[int]:
    """A port this process listens on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def _run(args: list[str], env: dict[str, str], home: Path) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "REDIS_URL"}}
    full = {**base, **{name: str(free_port()) for name in UP_PORTS}, "KIZO_HOME": str(home),
            "KIZO_PROXY_FILE": "none", "KIZO_PG_FSYNC": "off", **env}  # fmt: skip
    return subprocess.run([sys.executable, "-m", "kizo.cli", *args], env=full, cwd=ROOT,
                          capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)  # fmt: skip


def _assert_one_line(done: subprocess.CompletedProcess[str], command: str, port: int,
                     variable: str) -> None:  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"kizo {command}: 127.0.0.1:{port} is already in use (pid "), lines
    assert f"pid {os.getpid()} (" in lines[0], "the holder is named"
    assert f"set {variable}" in lines[0]


@pytest.mark.parametrize(
    ("args", "variable"),
    [
        (["proxy"], "KIZO_PROXY_API_PORT"),
        (["bank"], "KIZO_BANK_PORT"),
        (["api"], "KIZO_API_PORT"),
        (["janitor"], "KIZO_JANITOR_METRICS_PORT"),
        (["worker", "--metrics-port", "{port}"], "--metrics-port"),
    ],
)
def test_a_process_whose_port_is_taken_says_so_in_one_line(
    tmp_path: Path, args: list[str], variable: str
) -> None:
    with _held() as port:
        argv = [a.format(port=port) for a in args]
        env = {variable: str(port)} if variable.startswith("KIZO_") else {}
        _assert_one_line(_run(argv, env, tmp_path), args[0], port, variable)


def test_the_proxy_says_which_proxy_of_its_file_cannot_listen(tmp_path: Path) -> None:
    with _held() as port:
        proxies = tmp_path / "proxies.json"
        proxies.write_text(json.dumps([{"name": "postgres", "listen": f"127.0.0.1:{port}",
                                        "upstream": "127.0.0.1:1"}]))  # fmt: skip
        done = _run(["proxy"], {"KIZO_PROXY_FILE": str(proxies)}, tmp_path)
        _assert_one_line(done, "proxy", port, "KIZO_PROXY_FILE")
        assert f"proxy postgres of {proxies}" in done.stderr


UP_CASES = ["KIZO_PROXY_API_PORT", "KIZO_API_PORT", "KIZO_WORKER_METRICS_PORT",
            "KIZO_PG_PORT", "KIZO_REDIS_PORT", "KIZO_PROMETHEUS_PORT"]  # fmt: skip


@pytest.mark.parametrize("variable", UP_CASES)
def test_kizo_up_with_a_port_taken_says_so_in_one_line_and_starts_nothing(
    tmp_path: Path, variable: str
) -> None:
    if variable == "KIZO_PROMETHEUS_PORT" and prometheus.binary("prometheus") is None:
        pytest.skip("no prometheus binary here: kizo up would start none, so binds nothing")
    with _held() as port:
        done = _run(["up"], {variable: str(port)}, tmp_path)
        _assert_one_line(done, "up", port, variable)
    assert "ready" not in done.stdout
    assert not (tmp_path / "pepper").exists() or variable in {"KIZO_PG_PORT", "KIZO_REDIS_PORT"}
