"""``kizo api`` (serve the REST API), ``kizo keys rotate``; ``kizo up`` starts the API last."""

from __future__ import annotations

import argparse

from infra.commands import Command, UsageError
from infra.config import Config


def _configure_api(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workers", type=int, default=None, help="granian processes (1-16; KIZO_API_WORKERS)"
    )


def _api(config: Config, args: argparse.Namespace) -> int:
    from infra.addresses import ensure_free

    ensure_free(config.host, config.api_port, "KIZO_API_PORT")
    from infra.metrics import use_multiprocess_dir

    workers = config.api_workers if args.workers is None else args.workers
    if not 1 <= workers <= 16:
        raise UsageError("--workers must be between 1 and 16")
    # Before anything imports prometheus_client: granian's worker processes (however many)
    # write their metrics there, and /metrics, whichever worker answers, sums them all.
    use_multiprocess_dir(config.home / "metrics" / f"api-{config.api_port}")
    from api._auth import require_secrets
    from infra.serve import serve_asgi

    require_secrets(config.auth)
    _open_keyring(config)  # a wrong KIZO_KEYRING_KEY is one line here, not a trace per worker
    serve_asgi("api.app:create_app", config.host, config.api_port, workers=workers)
    return 0


def _configure_keys(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["rotate"], help="rotate: a new key signs from now on")


def _open_keyring(config: Config) -> None:
    """Make the first signing key if there is none, and open the ring with KIZO_KEYRING_KEY."""
    import asyncpg

    from api._auth import ensure_key
    from infra import aio

    async def check() -> None:
        conn = await asyncpg.connect(config.pg_url(), timeout=10)
        try:
            await ensure_key(conn, config.auth.keyring_key)
        finally:
            await conn.close()

    try:
        aio.run(check())
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise UsageError(f"cannot open the signing keys in PostgreSQL: {exc}") from None


def _keys(config: Config, _args: argparse.Namespace) -> int:
    import asyncpg

    from api._auth import require_secrets, rotate_key
    from infra import aio
    from infra.devsecrets import with_dev_secrets

    config = with_dev_secrets(config)  # beside `kizo up`: the key it keeps in KIZO_HOME
    require_secrets(config.auth, pepper=False)

    async def rotate() -> str:
        conn = await asyncpg.connect(config.pg_url(), timeout=10)
        try:
            return await rotate_key(conn, config.auth.keyring_key)
        finally:
            await conn.close()

    print(f"new signing key {aio.run(rotate())}; the previous one still verifies")
    return 0


def _configure_admin(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["create"])
    parser.add_argument("email")
    parser.add_argument("--name", default="Admin")
    parser.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from standard input instead of prompting",
    )


def _admin(config: Config, args: argparse.Namespace) -> int:
    import getpass
    import sys

    from api import _service as svc
    from api._auth import Passwords, require_secrets
    from api._problems import Problem
    from infra import aio
    from infra.db import create_pool
    from infra.devsecrets import with_dev_secrets

    config = with_dev_secrets(config)  # beside `kizo up`: the pepper it keeps in KIZO_HOME
    require_secrets(config.auth, keyring_key=False)

    password = sys.stdin.readline().rstrip("\n") if args.password_stdin else getpass.getpass()
    if not 8 <= len(password) <= 128:
        raise UsageError("the password must have 8 to 128 characters")

    async def create() -> svc.User:
        pool = await create_pool(
            config.pg_url(), min_size=1, max_size=2, acquire_timeout_s=config.pools.wait_s
        )
        passwords = Passwords(config.auth)
        try:
            return await svc.make_admin(
                pool, args.email, args.name, await passwords.hash(password), config.ledger.currency
            )
        finally:
            await passwords.aclose()
            await pool.close()

    try:
        user = aio.run(create())
    except Problem as exc:
        raise UsageError(exc.detail) from None
    print(f"admin {user.email} created ({user.id})")
    return 0


COMMANDS = [
    Command("keys", _keys, _configure_keys),
    Command("api", _api, _configure_api),
    Command("admin", _admin, _configure_admin),
]
