"""Run the bank: its database (created and migrated on start), then granian in this process.

Granian's embedded server runs the ASGI app on the caller's event loop (uvloop, one worker), so
the pool opened here is handed to the app directly instead of through module globals. SIGTERM
and SIGINT stop the server gracefully; the stop is bounded, then the pool closes.
"""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import asyncpg
import structlog

from chaos.mockbank import store
from chaos.mockbank.app import create_asgi
from chaos.mockbank.settings import BankSettings, database_name, with_database
from infra import logs
from infra.db import create_pool
from infra.migrate import migrate

STOP_TIMEOUT_S = 15.0
CONNECT_TIMEOUT_S = 10.0
log = structlog.get_logger("kizo.mockbank")


class ServeError(RuntimeError):
    """The HTTP server could not run (granian reports a port in use as a RuntimeError)."""


def configure_logging() -> None:
    """JSON events on stderr, like every Kizo process (infra.logs); the bank is its own."""
    logs.configure("bank")


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def ensure_database(url: str) -> None:
    """Create the bank's database on first start (it lives on the same server as Kizo's)."""
    try:
        conn = await asyncpg.connect(url, timeout=CONNECT_TIMEOUT_S)
    except asyncpg.InvalidCatalogNameError:
        admin = await asyncpg.connect(with_database(url, "postgres"), timeout=CONNECT_TIMEOUT_S)
        try:
            await admin.execute(f"CREATE DATABASE {_quote_ident(database_name(url))}")
            log.info("bank_database_created", database=database_name(url))
        except (asyncpg.DuplicateDatabaseError, asyncpg.UniqueViolationError):
            pass  # another bank process created it first
        finally:
            await admin.close()
    else:
        await conn.close()


async def open_pool(settings: BankSettings) -> asyncpg.Pool:
    await ensure_database(settings.database_url)
    # Its own fetch/execute wait for a connection at most db_timeout_s too (asyncpg's would
    # wait forever when every connection is busy).
    pool = await create_pool(
        settings.database_url,
        min_size=1,
        max_size=settings.pool_size_max,
        acquire_timeout_s=settings.db_timeout_s,
        timeout=CONNECT_TIMEOUT_S,
        command_timeout=settings.db_timeout_s,
    )
    async with pool.acquire(timeout=CONNECT_TIMEOUT_S) as conn:
        applied = await migrate(conn, store.MIGRATIONS)
    if applied:
        log.info("bank_migrated", applied=applied)
    return pool


async def serve(settings: BankSettings) -> None:
    """Serve until SIGTERM or SIGINT."""
    from granian.constants import Interfaces
    from granian.log import LogLevels
    from granian.server.embed import Server

    pool = await open_pool(settings)
    try:
        server = Server(
            create_asgi(settings, pool),
            address=settings.host,
            port=settings.port,
            interface=Interfaces.ASGI,
            log_level=LogLevels.error,  # granian warns that embedding is experimental
            log_access=False,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        log.info("bank_starting", url=f"http://{settings.host}:{settings.port}")
        await _run_until(server, stop)
    finally:
        try:
            await asyncio.wait_for(pool.close(), STOP_TIMEOUT_S)
        except TimeoutError:
            pool.terminate()
        log.info("bank_stopped")


async def _run_until(server: Any, stop: asyncio.Event) -> None:
    """Serve until ``stop`` is set (or the server ends), then give it ``STOP_TIMEOUT_S`` to
    finish the requests in flight; its failures (a port in use) propagate."""
    serving = asyncio.create_task(server.serve())
    stopping = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
    server.stop()
    try:
        await asyncio.wait_for(serving, STOP_TIMEOUT_S)
    except TimeoutError:
        log.warning("bank_stop_timeout", timeout_s=STOP_TIMEOUT_S)
    except RuntimeError as exc:
        # Its message may carry a Rust backtrace: the first line says what happened.
        raise ServeError(str(exc).splitlines()[0] if str(exc) else "granian failed") from None
