"""``kizo bank`` (serve the mock bank) and ``kizo bank-faults`` (show or set its faults).

``kizo up`` starts the bank first among Kizo's processes: workers and the janitor call it.
Module-level imports stay light; the server's are loaded by the command that needs them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any

from infra.commands import Command, UsageError
from infra.config import Config

FAULTS_TIMEOUT_S = 5.0
LATENCY_MAX_MS = 10_000
SEED_ABS_MAX = 2**63 - 1


def _serve(config: Config, _args: argparse.Namespace) -> int:
    import asyncpg

    from chaos.mockbank.server import ServeError, configure_logging, serve
    from chaos.mockbank.settings import settings_from_env
    from infra import aio
    from infra.addresses import ensure_free
    from infra.migrate import MigrationError

    settings = settings_from_env(config, os.environ)
    ensure_free(settings.host, settings.port, "KIZO_BANK_PORT")
    configure_logging()
    try:
        aio.run(serve(settings))
    except (OSError, asyncpg.PostgresError, MigrationError, ServeError) as exc:
        print(f"kizo bank: cannot serve: {exc.__class__.__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


def _configure_faults(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--error-rate", metavar="X", help="share answered 503, unprocessed (0-1)")
    parser.add_argument("--latency-ms", metavar="N", help="delay before each answer (0-10000)")
    parser.add_argument("--drop-rate", metavar="X", help="share processed, answer dropped (0-1)")
    parser.add_argument("--lose-rate", metavar="X",
                        help="share read, then lost unprocessed, no answer (0-1)")  # fmt: skip
    parser.add_argument("--seed", metavar="N", help="seed of the fault dice, for repeatable runs")
    parser.add_argument("--clear", action="store_true", help="remove every fault (first)")
    parser.add_argument("--show", action="store_true", help="print the faults (the default)")


def _rate(flag: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise UsageError(f"{flag} takes a number from 0 to 1, got {raw!r}") from None
    if math.isnan(value) or not 0 <= value <= 1:
        raise UsageError(f"{flag} must be between 0 and 1, got {raw}")
    return value


def _integer(flag: str, raw: str, low: int, high: int) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise UsageError(f"{flag} takes an integer, got {raw!r}") from None
    if not low <= value <= high:
        raise UsageError(f"{flag} must be between {low} and {high}, got {value}")
    return value


def fault_changes(args: argparse.Namespace) -> dict[str, Any]:
    """The ``PUT /admin/faults`` body the flags ask for; UsageError on a bad value."""
    body: dict[str, Any] = {}
    if args.error_rate is not None:
        body["error_rate"] = _rate("--error-rate", args.error_rate)
    if args.latency_ms is not None:
        body["latency_ms"] = _integer("--latency-ms", args.latency_ms, 0, LATENCY_MAX_MS)
    if args.drop_rate is not None:
        body["drop_rate"] = _rate("--drop-rate", args.drop_rate)
    if args.lose_rate is not None:
        body["lose_rate"] = _rate("--lose-rate", args.lose_rate)
    if args.seed is not None:
        body["seed"] = _integer("--seed", args.seed, -SEED_ABS_MAX, SEED_ABS_MAX)
    return body


def _faults(config: Config, args: argparse.Namespace) -> int:
    import httpx

    body = fault_changes(args)  # validated before anything is sent
    url = f"http://{config.host}:{config.bank_port}/admin/faults"
    try:
        with httpx.Client(timeout=FAULTS_TIMEOUT_S) as client:
            response = client.delete(url) if args.clear else None
            if body:
                response = client.put(url, json=body)
            if response is None:
                response = client.get(url)
    except httpx.HTTPError as exc:
        print(
            f"kizo: the bank is not reachable at {url} ({exc.__class__.__name__})", file=sys.stderr
        )
        return 1
    if response.status_code != 200:
        raise UsageError(f"the bank refused ({response.status_code}): {_detail(response)}")
    print(json.dumps(response.json()))
    return 0


def _detail(response: Any) -> str:
    try:
        return str(response.json().get("detail", ""))[:200]
    except ValueError:
        return str(response.text)[:200]


COMMANDS = [
    Command("bank-faults", _faults, _configure_faults),
    Command("bank", _serve),
]
