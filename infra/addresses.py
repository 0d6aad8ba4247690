"""A taken address said in one line: which address, who holds it, and the setting that moves it.

Every ``kizo`` command that serves checks its addresses before it starts anything
(``ensure_free``), and turns a bind that fails anyway (another process won the race) into the
same error. ``kizo.cli`` prints it as ``kizo <command>: <message>`` and exits 2, like any other
bad input: no trace, nothing started. The holder is found through ``/proc`` (the listening
socket's inode in ``/proc/net/tcp``, then the process with that socket open), when this user
may see it.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from infra.ports import bindable

_TCP_LISTEN = "0A"  # the state column of /proc/net/tcp for a listening socket
PROC_SCAN_MAX = 4096
COMMAND_SHOWN_MAX = 60  # processes looked through for the holder; past that it goes unnamed


class AddressInUse(Exception):
    """``host:port`` is taken; ``variable`` names the setting that moves it."""

    def __init__(self, host: str, port: int, variable: str = "", holder: str | None = None):
        self.host, self.port, self.variable = host, port, variable
        self.holder = holder if holder is not None else listener_of(port)
        super().__init__(self.message())

    def message(self) -> str:
        hint = f"set {self.variable} or stop it" if self.variable else "stop it"
        return f"{self.host}:{self.port} is already in use ({self.holder}; {hint})"

    def for_variable(self, variable: str) -> AddressInUse:
        return AddressInUse(self.host, self.port, variable, self.holder)


def ensure_free(host: str, port: int, variable: str) -> None:
    """Raise ``AddressInUse`` unless ``host:port`` can be bound now (port 0 always can)."""
    if port and not bindable(host, port):
        raise AddressInUse(host, port, variable)


def is_in_use(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE


def listener_of(port: int) -> str:
    """Who listens on ``port``: "pid N (name) listens there", or as much as can be seen."""
    inodes = _listening_inodes(port)
    if not inodes:
        return "another process holds it"
    for pid, name in _holders(inodes):
        return f"pid {pid} ({name}) listens there"
    return "another process listens there"


def _listening_inodes(port: int) -> set[str]:
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            listening = len(fields) > 9 and fields[3] == _TCP_LISTEN
            if listening and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    return inodes


def _holders(inodes: set[str]) -> list[tuple[int, str]]:
    wanted = {f"socket:[{inode}]" for inode in inodes}
    found: list[tuple[int, str]] = []
    pids = [entry for entry in os.listdir("/proc") if entry.isdigit()][:PROC_SCAN_MAX]
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue  # gone, or not ours to look into
        if any(_link(f"/proc/{pid}/fd/{fd}") in wanted for fd in fds):
            found.append((int(pid), _command(pid)))
    return found


def _link(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""  # closed meanwhile


def _command(pid: str) -> str:
    """The command line, shortened (a bare "python3" would say little), else the name."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        line = " ".join(" ".join(a.decode(errors="replace").split()) for a in args if a)
        if not line:  # a kernel thread, or a process that blanked its arguments
            line = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        line = "?"
    return line if len(line) <= COMMAND_SHOWN_MAX else line[: COMMAND_SHOWN_MAX - 3] + "..."
