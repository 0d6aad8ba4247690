"""The bank's own settings, read once by ``kizo bank`` from the environment and passed down.

The bank shares Kizo's PostgreSQL server but never Kizo's database: unless ``BANK_DATABASE_URL``
names one, it uses Kizo's URL with the database name replaced by ``bank``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from infra.config import Config, ConfigError

BANK_DATABASE = "bank"
DropMode = Literal["reset", "hold"]

# Bounds on what an operator may configure: the bank is a test double, not a place for surprises.
OPENING_BALANCE_MAX_MINOR = 10**15
DROP_HOLD_MAX_S = 120.0


@dataclass(frozen=True)
class BankSettings:
    database_url: str
    host: str = "127.0.0.1"
    port: int = 8100
    currency: str = "USD"
    opening_balance_minor: int = 100_000_000
    # "reset": close the caller's connection without an answer; "hold": keep the caller waiting
    # for ``drop_hold_s`` (past any sane client timeout), then answer 504.
    drop_mode: DropMode = "reset"
    drop_hold_s: float = 30.0
    pool_size_max: int = 8
    db_timeout_s: float = 5.0


def with_database(url: str, database: str) -> str:
    """``url`` pointing at ``database`` on the same server (query string and credentials kept)."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgres", "postgresql") or (not parts.netloc and not parts.query):
        raise ConfigError(f"not a PostgreSQL URL: {parts.scheme}://…")
    return urlunsplit(parts._replace(path=f"/{database}"))


def database_name(url: str) -> str:
    name = urlsplit(url).path.lstrip("/")
    if not name:
        raise ConfigError("the bank's database URL names no database")
    return name


def bank_database_url(config: Config, env: Mapping[str, str]) -> str:
    """``BANK_DATABASE_URL`` if set, else Kizo's database URL with the database named ``bank``."""
    explicit = env.get("BANK_DATABASE_URL", "").strip()
    if explicit:
        return explicit
    return with_database(config.pg_url(), BANK_DATABASE)


def _int(env: Mapping[str, str], name: str, default: int, high: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if not 0 <= value <= high:
        raise ConfigError(f"{name} must be between 0 and {high}, got {value}")
    return value


def _float(env: Mapping[str, str], name: str, default: float, high: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if not 0 <= value <= high:
        raise ConfigError(f"{name} must be between 0 and {high}, got {value}")
    return value


def _drop_mode(env: Mapping[str, str]) -> DropMode:
    raw = env.get("KIZO_BANK_DROP_MODE", "").strip() or "reset"
    if raw == "reset":
        return "reset"
    if raw == "hold":
        return "hold"
    raise ConfigError(f"KIZO_BANK_DROP_MODE must be 'reset' or 'hold', got {raw!r}")


def settings_from_env(config: Config, env: Mapping[str, str]) -> BankSettings:
    url = bank_database_url(config, env)
    database_name(url)  # fail at start-up, not at the first request
    return BankSettings(
        database_url=url,
        host=config.host,
        port=config.bank_port,
        currency=config.ledger.currency,
        opening_balance_minor=_int(
            env, "KIZO_BANK_OPENING_BALANCE_MINOR", 100_000_000, OPENING_BALANCE_MAX_MINOR
        ),
        drop_mode=_drop_mode(env),
        drop_hold_s=_float(env, "KIZO_BANK_DROP_HOLD_S", 30.0, DROP_HOLD_MAX_S),
    )
