"""``kizo bench NAME``: benchmarks that print their figures (never timed unit tests)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from infra.commands import Command, UsageError, bounded_int
from infra.config import Config


def _configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "name", choices=["ledger", "pipeline", "api", "proxy"], help="what to measure"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--transfers", type=bounded_int(100, 2_000_000), help="default 40k / 20k")
    parser.add_argument("--accounts", type=bounded_int(10, 1_000_000), help="default 20k / 5k")
    parser.add_argument("--batch-size", type=bounded_int(1, 5000), default=200)
    parser.add_argument("--clients", type=bounded_int(1, 64), default=4)
    parser.add_argument("--pgbench-seconds", type=bounded_int(1, 600), default=10)
    parser.add_argument("--seed", type=int, default=1)
    pipeline = parser.add_argument_group("pipeline")
    pipeline.add_argument("--workers", type=bounded_int(1, 16), default=2)
    pipeline.add_argument("--lag-seconds", type=bounded_int(1, 600), default=10)
    pipeline.add_argument(
        "--rate-share",
        type=bounded_int(1, 100),
        default=60,
        help="offered rate for the lag run, in %% of measured capacity",
    )
    api = parser.add_argument_group("api")
    api.add_argument("--users", type=bounded_int(2, 10_000), default=200)
    api.add_argument("--seconds", type=bounded_int(1, 600), default=10, help="throughput run")
    api.add_argument(
        "--rate", type=bounded_int(1, 5_000), default=100, help="payments/s, flood run"
    )
    api.add_argument("--flood", type=bounded_int(1, 512), default=16, help="sign-in loops")
    api.add_argument("--windows", type=bounded_int(1, 40), default=8, help="pairs of windows")
    api.add_argument("--window-seconds", type=bounded_int(1, 120), default=4)
    proxy = parser.add_argument_group("proxy")
    proxy.add_argument("--pairs", type=bounded_int(1, 20), default=3,
                       help="pairs of pgbench windows (direct, proxied) per workload")  # fmt: skip


def _bench(config: Config, args: argparse.Namespace) -> int:
    if args.accounts is not None and args.accounts < 3:
        raise UsageError("--accounts must be at least 3")
    report, text = {"ledger": _ledger, "pipeline": _pipeline, "api": _api, "proxy": _proxy}[
        args.name
    ](config, args)
    print(json.dumps(report) if args.json else text)
    return 0


def _pipeline(config: Config, args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    from kizo.bench_pipeline import PipelineBenchParams, run, table

    params = PipelineBenchParams(
        transfers=args.transfers or 20_000,
        accounts=args.accounts or 5_000,
        workers=args.workers,
        shards=config.pipeline.shards,
        lag_seconds=args.lag_seconds,
        rate_share=args.rate_share / 100,
        clients=args.clients,
        pgbench_seconds=args.pgbench_seconds,
        seed=args.seed,
    )
    report = run(params)
    return report, table(report)


def _api(_config: Config, args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    from kizo.bench_api import ApiBenchParams, run, table

    params = ApiBenchParams(
        users=args.users,
        clients=args.clients if args.clients != 4 else ApiBenchParams.clients,
        seconds=args.seconds,
        rate=args.rate,
        flood=args.flood,
        windows=args.windows,
        window_seconds=args.window_seconds,
        pgbench_seconds=args.pgbench_seconds,
        seed=args.seed,
    )
    report = run(params)
    return report, table(report)


def _proxy(_config: Config, args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    from kizo.bench_proxy import ProxyBenchParams, run, table

    params = ProxyBenchParams(
        clients=args.clients if args.clients != 4 else ProxyBenchParams.clients,
        window_seconds=args.window_seconds,
        pairs=args.pairs,
    )
    report = run(params)
    return report, table(report)


def _ledger(config: Config, args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    from kizo.bench_ledger import LedgerBenchParams, run, table

    params = LedgerBenchParams(
        transfers=args.transfers or 40_000,
        accounts=args.accounts or 20_000,
        batch_size=args.batch_size,
        clients=args.clients,
        pgbench_seconds=args.pgbench_seconds,
        seed=args.seed,
        currency=config.ledger.currency,
    )
    report = run(params, config.database_url)
    return report, table(report)


COMMANDS = [
    Command("bench", _bench, _configure),
]
