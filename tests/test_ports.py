"""Ports picked for children (infra.ports): never the same for two pickers, never one held.

The pickers here work in a small window of ports and a lock directory of the test's own, so
that a picker without its cross-process claim would collide at once, not once in a thousand.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from infra import ports
from infra.addresses import listener_of
from infra.config import Config
from infra.processes import start_servers
from infra.readiness import redis_probe, wait_http, wait_reported_port
from infra.servers import stop_process

# A window of their own, outside the real picking range (whose pickers, in other test workers,
# would bind ports in it meanwhile) and below the kernel's ephemeral range; no default port of
# kizo up lies in it.
WINDOW_LOW = 17_100
PICKERS = 2
PICKS_EACH = 60
RACE_TIMEOUT_S = 60.0
WINDOW = PICKERS * PICKS_EACH + 40  # room to spare, so that a picker never runs out

_PICKER = """
import contextlib, json, sys, time
from pathlib import Path
from infra import ports
ports.LOCK_DIR = Path(sys.argv[1])
ports.PORT_RUN_LOW, ports.PORT_RUN_HIGH = int(sys.argv[2]), int(sys.argv[3])
hold = sys.argv[4] == "hold"
# Both pickers start picking at the same moment, to race for the same ports.
while time.time() < float(sys.argv[5]):
    time.sleep(0.001)
picked = []
with contextlib.ExitStack() as stack:
    for _ in range(int(sys.argv[6])):
        picked.append(stack.enter_context(ports.reserve_ports(1)) if hold else ports.free_port())
    Path(sys.argv[7] + ".tmp").write_text(json.dumps(picked))
    Path(sys.argv[7] + ".tmp").rename(sys.argv[7])
    sys.stdin.read()  # held until the other picker is done too: the parent closes our stdin
"""


@pytest.fixture
def window(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(ports, "LOCK_DIR", tmp_path / "locks")
    monkeypatch.setattr(ports, "PORT_RUN_LOW", WINDOW_LOW)
    monkeypatch.setattr(ports, "PORT_RUN_HIGH", WINDOW_LOW + WINDOW)
    return tmp_path / "locks"


def _race(locks: Path, mode: str, out: Path) -> list[list[int]]:
    start_at = str(time.time() + 1.5)  # after both interpreters have started
    args = [str(locks), str(WINDOW_LOW), str(WINDOW_LOW + WINDOW), mode, start_at,
            str(PICKS_EACH)]  # fmt: skip
    root = Path(__file__).resolve().parents[1]
    with contextlib.ExitStack() as stack:
        procs = []
        for i in range(PICKERS):
            proc = stack.enter_context(subprocess.Popen(
                [sys.executable, "-c", _PICKER, *args, str(out / f"{i}.json")],
                stdin=subprocess.PIPE, cwd=root))  # fmt: skip
            stack.callback(proc.kill)  # runs before Popen's exit waits: nothing is left behind
            procs.append(proc)
        deadline = time.monotonic() + RACE_TIMEOUT_S
        while not all((out / f"{i}.json").exists() for i in range(PICKERS)):
            assert time.monotonic() < deadline, "the pickers did not finish"
            assert all(proc.poll() is None for proc in procs), "a picker failed"
            time.sleep(0.05)
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.close()  # now both let go of their ports
            assert proc.wait(timeout=RACE_TIMEOUT_S) == 0
    return [json.loads((out / f"{i}.json").read_text()) for i in range(PICKERS)]


@pytest.mark.parametrize("mode", ["lease", "hold"])
def test_two_processes_picking_at_once_never_get_the_same_port(
    window: Path, mode: str, tmp_path: Path
) -> None:
    picked = _race(window, mode, tmp_path)
    every = [port for one in picked for port in one]
    assert len(every) == PICKERS * PICKS_EACH
    assert len(set(every)) == len(every), "two pickers got the same port"
    assert all(WINDOW_LOW <= port < WINDOW_LOW + WINDOW for port in every)


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(held=st.sets(st.integers(0, 19), min_size=1, max_size=19))
def test_a_port_someone_holds_is_never_returned(
    window: Path, monkeypatch: pytest.MonkeyPatch, held: set[int]
) -> None:
    """Held: bound and listening by another socket, or claimed by another picker (the lock
    file flocked by another open file, as another process holds it)."""
    low = WINDOW_LOW + 200 + 20 * (len(held) % 5)  # a fresh window now and then: leases last
    monkeypatch.setattr(ports, "PORT_RUN_LOW", low)
    monkeypatch.setattr(ports, "PORT_RUN_HIGH", low + 21)
    for port in range(low, low + 21):
        ports.release(port)  # leases of earlier examples end
    with contextlib.ExitStack() as stack:
        for offset in held:
            port = low + offset
            if offset % 2:
                sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                sock.bind(("127.0.0.1", port))
                sock.listen()
            else:
                fd = os.open(ports.LOCK_DIR / f"{port}.lock", os.O_RDWR | os.O_CREAT)
                stack.callback(os.close, fd)
                fcntl.flock(fd, fcntl.LOCK_EX)
        free = 20 - len(held)
        picked = [ports.free_port() for _ in range(free)]
        assert not {p - low for p in picked} & held
        assert len(set(picked)) == len(picked)
        with pytest.raises(ports.NoFreePort):
            ports.free_port()  # every other port is held or leased now


def test_a_reservation_ends_with_its_block_and_a_lease_with_release(window: Path) -> None:
    with ports.reserve_ports(3) as base:
        assert ports._claim("127.0.0.1", base + 1, hold=False) is None
    assert ports._claim("127.0.0.1", base + 1, hold=False) == -1  # free again, leased now
    assert ports._claim("127.0.0.1", base + 1, hold=False) is None
    ports.release(base + 1)
    assert ports._claim("127.0.0.1", base + 1, hold=False) == -1


def test_a_server_whose_port_is_taken_starts_again_on_another(tmp_path: Path) -> None:
    env = {"KIZO_HOME": str(tmp_path / "home"), "DATABASE_URL": "postgresql://nowhere/kizo"}
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken, contextlib.ExitStack() as st_:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env["KIZO_REDIS_PORT"] = str(taken.getsockname()[1])
        config = start_servers(
            Config.from_env(env), st_, say=lambda _m: None, scratch=True,
            pick_port=lambda: st_.enter_context(ports.reserve_ports(1)),
        )  # fmt: skip
        assert config.redis_port != taken.getsockname()[1]
        assert config.valkey_url().endswith(f":{config.redis_port}/0")
        assert redis_probe("127.0.0.1", config.redis_port)() is None


def test_the_proxy_started_on_port_0_reports_the_port_it_bound(tmp_path: Path) -> None:
    env = {**os.environ, "KIZO_HOME": str(tmp_path), "KIZO_PROXY_API_PORT": "0",
           "KIZO_PROXY_FILE": "none"}  # fmt: skip
    log_path = tmp_path / "proxy.log"
    with log_path.open("wb") as log, subprocess.Popen(
        [sys.executable, "-m", "kizo.cli", "proxy"], env=env, stdout=log, stderr=log,
        stdin=subprocess.DEVNULL, cwd=Path(__file__).resolve().parents[1],
    ) as proc:  # fmt: skip
        try:
            port = wait_reported_port(tmp_path / "run", "proxy", proc=proc, log=log_path)
            assert port != 0
            assert f"pid {proc.pid} " in listener_of(port), "the port it reported is its own"
            wait_http(f"http://127.0.0.1:{port}/version", proc=proc, log=log_path)
        finally:
            stop_process(proc)
