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


def _children(config: Config) -> list[Child]:
    url = f"http://{config.host}:{config.api_port}"
    return [Child("api", ["api"], ready_port=config.api_port, url=f"{url}/api/v1")]


register(Command("api", "serve the REST API", _api, _configure_api))
register(Command("keys", "manage the JWT signing keys", _keys, _configure_keys))
register_child(_children)
