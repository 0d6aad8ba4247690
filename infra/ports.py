"""Ports for servers that are told a port number, picked so that no other process takes them.

The old way (bind port 0, read the number, close, hand it to a child) raced: port 0 draws from
the kernel's ephemeral range, where every outgoing connection of every process on the machine
takes ports too, and a port picked by one test worker was sometimes bound by another process
before the child got to it. So:

- picks come from a range the kernel never hands out for port 0 or outgoing connections
  (``PORT_RUN_LOW``..``PORT_RUN_HIGH``, below Linux's default ephemeral range 32768-60999);
- each pick is claimed across processes in a lock file per port under ``LOCK_DIR``: the claim
  is checked and made under ``fcntl.flock``, so two pickers never both win one port;
- a claim either lasts while its owner holds the file open (``reserve_ports``: a scratch
  system keeps its ports for its whole life, so a crashed server restarts on its own port), or
  is a lease of ``LEASE_S`` written in the file (``free_port``: the caller only gets a number,
  so nothing is left open for the garbage collector), long enough for any child to bind; after
  that the bound port is refused by the bind check;
- a port bound by anyone (inside the range or not) is refused by a test bind before it is
  returned.

A server that still finds its port taken (a process outside this scheme) is started again on
another pick: ``infra.processes.start_servers``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import random
import socket
import tempfile
import time
from collections.abc import Collection, Iterator
from pathlib import Path

PORT_RUN_LOW, PORT_RUN_HIGH = 20_000, 32_000
LEASE_S = 300.0  # a lease outlives any bounded start (START_TIMEOUT_S is 30 s per server)
PICK_ATTEMPTS_MAX = 400
LOCK_DIR = Path(tempfile.gettempdir()) / "kizo-ports"
# Inside the range, never picked: the listen ports of toxiproxy/toxiproxy.json, which a
# developer's `kizo up` binds while tests run beside it.
FIXED_PORTS = frozenset({25432, 26379, 28100})


class NoFreePort(OSError):
    """No port (or run of ports) could be claimed within ``PICK_ATTEMPTS_MAX`` tries."""


def bindable(host: str, port: int) -> bool:
    """Whether a server could bind ``port`` now: nothing listens on it. With SO_REUSEADDR, as
    every server here binds: the TIME_WAIT left by a stopped server's connections must not
    keep it from starting again on its port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def _lock_path(port: int) -> Path:
    LOCK_DIR.mkdir(mode=0o777, parents=True, exist_ok=True)
    return LOCK_DIR / f"{port}.lock"


def _open_locked(port: int) -> int | None:
    """The port's lock file, opened and flocked; None if another process holds it."""
    try:
        fd = os.open(_lock_path(port), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except OSError:
        return None  # a file of another user, say: not ours to claim
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return None
        raise
    return fd


def _leased(fd: int, now: float) -> bool:
    """Whether the file holds an unexpired lease (its expiry time, as text)."""
    text = os.pread(fd, 64, 0).decode(errors="replace").strip()
    try:
        return float(text) > now
    except ValueError:
        return False  # empty (never leased, or released)


def _write_lease(fd: int, until: float) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{until:.3f}".encode(), 0)


def _claim(host: str, port: int, hold: bool) -> int | None:
    """Claim ``port``: the locked fd if ``hold`` (the caller closes it), else -1 with a lease
    written and the file closed; None if it is claimed or bound by someone else."""
    fd = _open_locked(port)
    if fd is None:
        return None
    try:
        now = time.time()  # wall clock: leases are compared across processes
        if _leased(fd, now) or not bindable(host, port):
            os.close(fd)
            return None
        # A held claim leases too: if its owner is killed, the lock goes with it, and the lease
        # still covers the child it was starting.
        _write_lease(fd, now + LEASE_S)
    except BaseException:
        os.close(fd)
        raise
    if hold:
        return fd
    os.close(fd)
    return -1


def _claim_run(host: str, base: int, count: int, hold: bool) -> list[int] | None:
    """Every port of ``base .. base + count - 1``, or none of them (claims made are undone)."""
    fds: list[int] = []
    for port in range(base, base + count):
        fd = _claim(host, port, hold)
        if fd is None:
            for done, held in zip(range(base, port), fds, strict=True):
                if held >= 0:
                    _write_lease(held, 0.0)
                    os.close(held)
                else:
                    release(done)
            return None
        fds.append(fd)
    return fds


def _pick(count: int, host: str, avoid: Collection[int], hold: bool) -> tuple[int, list[int]]:
    rng = random.Random()
    avoided = set(avoid) | FIXED_PORTS
    for _ in range(PICK_ATTEMPTS_MAX):
        base = rng.randrange(PORT_RUN_LOW, PORT_RUN_HIGH - count)
        if set(range(base, base + count)) & avoided:
            continue
        fds = _claim_run(host, base, count, hold)
        if fds is not None:
            return base, fds
    raise NoFreePort(f"no run of {count} free ports on {host} in {PORT_RUN_LOW}-{PORT_RUN_HIGH}")


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody binds and no other picker has claimed, leased for ``LEASE_S``."""
    return _pick(1, host, (), hold=False)[0]


def free_port_run(count: int, host: str = "127.0.0.1", avoid: Collection[int] = ()) -> int:
    """The first of ``count`` consecutive free ports (none in ``avoid``), each leased: for
    processes that serve on a base port plus their index (``kizo up``'s workers)."""
    return _pick(count, host, avoid, hold=False)[0]


def release(port: int) -> None:
    """End a lease early (its child serves: the bind check refuses the port from now on)."""
    fd = _open_locked(port)
    if fd is None:
        return  # held by its owner: the owner ends it
    try:
        _write_lease(fd, 0.0)
    finally:
        os.close(fd)


@contextlib.contextmanager
def reserve_ports(count: int, host: str = "127.0.0.1") -> Iterator[int]:
    """``count`` consecutive ports, claimed until the block ends (the base is yielded): no
    other picker gets them meanwhile, even while their server is down between a crash and its
    restart."""
    base, fds = _pick(count, host, (), hold=True)
    try:
        yield base
    finally:
        for fd in fds:
            _write_lease(fd, 0.0)
            os.close(fd)


def report_port(run_dir: Path, name: str, port: int) -> Path:
    """Write ``port`` to ``run_dir/<name>.port`` atomically (a reader never sees half of it):
    how a child that bound port 0 tells its parent where it serves."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / f"{name}.port"
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(f"{port}\n")
    partial.replace(path)
    return path


def reported_port(run_dir: Path, name: str) -> int | None:
    """The port a child reported with ``report_port``; None until it has."""
    try:
        return int((run_dir / f"{name}.port").read_text())
    except (OSError, ValueError):
        return None
