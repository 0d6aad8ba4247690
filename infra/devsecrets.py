"""Secrets for development systems, made here so that no system ever runs on a known one.

A real deployment sets ``KIZO_PEPPER`` and ``KIZO_KEYRING_KEY`` itself: the API refuses to start
without them (api/_auth.py ``require_secrets``). Two kinds of system make their own instead:

- ``kizo up`` on its embedded PostgreSQL: the database lives in KIZO_HOME, so the secrets that
  protect it live there too (generated once, mode 0600, created atomically) and share its fate;
  ``kizo up`` hands them to its processes, and the commands run beside it read them.
- a scratch system (infra/system.py): fresh random secrets in its environment only, and the token
  that lets its processes honour ``KIZO_MUTATION`` (infra/config.py ``_mutation``).
"""

from __future__ import annotations

import dataclasses
import os
import secrets
from pathlib import Path

from infra.config import (
    SCRATCH_MARK_VAR,
    SCRATCH_MARKER_FILE,
    Config,
    ConfigError,
    keyring_key,
)

PEPPER_FILE = "pepper"
KEYRING_KEY_FILE = "keyring-key"
SECRET_BYTES = 32
_FILES = {"KIZO_PEPPER": PEPPER_FILE, "KIZO_KEYRING_KEY": KEYRING_KEY_FILE}


def up_env(config: Config) -> dict[str, str]:
    """The secrets ``kizo up`` adds to its children's environment: on the embedded database,
    those the environment does not set, from KIZO_HOME (made there on first use). On servers of
    one's own, none: both must then be set, since losing a file would lock every user out."""
    if config.mutation:
        raise ConfigError("kizo up never runs a mutation (KIZO_MUTATION); unset it")
    unset = _unset(config)
    if not config.embedded_postgres:
        if unset:
            raise ConfigError(f"{' and '.join(unset)} must be set when DATABASE_URL is")
        return {}
    config.home.mkdir(parents=True, exist_ok=True)
    return {name: _secret(config.home / _FILES[name], create=True) for name in unset}


def with_dev_secrets(config: Config) -> Config:
    """For commands run beside ``kizo up`` (``kizo keys rotate``, ``kizo admin create``): on the
    embedded database, the secrets the environment does not set come from ``kizo up``'s files."""
    unset = _unset(config)
    if not config.embedded_postgres or not unset:
        return config
    found = {name: _secret(config.home / _FILES[name], create=False) for name in unset}
    auth = dataclasses.replace(
        config.auth,
        pepper=found.get("KIZO_PEPPER", config.auth.pepper),
        keyring_key=keyring_key(found.get("KIZO_KEYRING_KEY")) or config.auth.keyring_key,
    )
    return dataclasses.replace(config, auth=auth)


def scratch_env(home: Path) -> dict[str, str]:
    """A scratch system's own secrets, and the marker (in its temporary ``home``) and token
    that let its processes, and no others, honour KIZO_MUTATION."""
    token = secrets.token_urlsafe(SECRET_BYTES)
    _write_new(home / SCRATCH_MARKER_FILE, token)
    return {
        SCRATCH_MARK_VAR: token,
        "KIZO_PEPPER": secrets.token_urlsafe(SECRET_BYTES),
        "KIZO_KEYRING_KEY": secrets.token_urlsafe(SECRET_BYTES),
    }


def _unset(config: Config) -> list[str]:
    missing = {"KIZO_PEPPER": config.auth.pepper, "KIZO_KEYRING_KEY": config.auth.keyring_key}
    return [name for name, value in missing.items() if not value]


def _secret(path: Path, *, create: bool) -> str:
    if not path.exists():
        if not create:
            raise ConfigError(f"{path} does not exist: start the system with `kizo up` first")
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
        _write_new(tmp, secrets.token_urlsafe(SECRET_BYTES))
        try:
            # A hard link appears whole and never replaces: of two racing `kizo up`, the
            # first one's secret wins and both use it.
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise ConfigError(f"{path} is readable by others (mode {mode:o}): chmod 600 it")
    value = path.read_text().strip()
    if not value:
        raise ConfigError(f"{path} is empty: delete it and start `kizo up` again")
    return value


def _write_new(path: Path, value: str) -> None:
    """Create ``path`` with mode 0600 from the start (never readable by others, even briefly)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(value + "\n")
        file.flush()
        os.fsync(file.fileno())
