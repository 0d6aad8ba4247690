"""``kizo bench NAME``: benchmarks that print their figures (never timed unit tests)."""

from __future__ import annotations

import argparse
import json

from kizo.cli import Command, UsageError, register
from kizo.config import Config


def _bounded(low: int, high: int) -> type[int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {raw!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low} and {high}, got {value}")
        return value

    return parse  # type: ignore[return-value]


def _configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=["ledger"], help="what to measure")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--transfers", type=_bounded(100, 2_000_000), default=40_000)
    parser.add_argument("--accounts", type=_bounded(10, 1_000_000), default=20_000)
    parser.add_argument("--batch-size", type=_bounded(1, 5000), default=200)
    parser.add_argument("--clients", type=_bounded(1, 64), default=4)
    parser.add_argument("--pgbench-seconds", type=_bounded(1, 600), default=10)
    parser.add_argument("--seed", type=int, default=1)


def _bench(config: Config, args: argparse.Namespace) -> int:
    from kizo.bench_ledger import LedgerBenchParams, run, table

    if args.accounts < 3:
        raise UsageError("--accounts must be at least 3")
    params = LedgerBenchParams(
        transfers=args.transfers,
        accounts=args.accounts,
        batch_size=args.batch_size,
        clients=args.clients,
        pgbench_seconds=args.pgbench_seconds,
        seed=args.seed,
        currency=config.ledger.currency,
    )
    report = run(params, config.database_url)
    print(json.dumps(report) if args.json else table(report))
    return 0


register(Command("bench", "measure the ledger against pgbench", _bench, _configure))
