"""``kizo api`` (serve the REST API), ``kizo keys rotate``; ``kizo up`` starts the API last."""

from __future__ import annotations

import argparse

from kizo.cli import Command, UsageError, register
from kizo.config import Config
from kizo.supervisor import Child, register_child


def _configure_api(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=int, default=1, help="granian worker processes (1-16)")


def _api(config: Config, args: argparse.Namespace) -> int:
    from kizo.serve import serve_asgi

    if not 1 <= args.workers <= 16:
        raise UsageError("--workers must be between 1 and 16")
    serve_asgi("api.app:create_app", config.host, config.api_port, workers=args.workers)
    return 0


def _configure_keys(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["rotate"], help="rotate: a new key signs from now on")


def _keys(config: Config, _args: argparse.Namespace) -> int:
    import asyncpg

    from api._auth import rotate_key
    from kizo import aio

    async def rotate() -> str:
        conn = await asyncpg.connect(config.pg_url(), timeout=10)
        try:
            return await rotate_key(conn)
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
    from api._auth import Passwords
    from api._problems import Problem
    from kizo import aio
    from kizo.db import create_pool

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


def _children(config: Config) -> list[Child]:
    url = f"http://{config.host}:{config.api_port}"
    return [Child("api", ["api"], ready_port=config.api_port, url=f"{url}/api/v1")]


register(Command("api", "serve the REST API", _api, _configure_api))
register(Command("keys", "manage the JWT signing keys", _keys, _configure_keys))
register(
    Command("admin", "create admin users (never through the public API)", _admin, _configure_admin)
)
register_child(_children)
