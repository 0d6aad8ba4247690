"""``kizo bench NAME``: benchmarks that print their figures (never timed unit tests)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from infra.commands import Command, UsageError, bounded_int
from infra.config import Config


def _configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "name", choices=["ledger", "pipeline", "api", "proxy", "e2e"], help="what to measure"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--transfers", type=bounded_int(100, 2_000_000), help="default 40k / 20k")
    parser.add_argument("--accounts", type=bounded_int(10, 1_000_000), help="default 20k / 5k")
    parser.add_argument("--batch-size", type=bounded_int(1, 5000), default=200)
    parser.add_argument("--clients", type=bounded_int(1, 64), default=4)
    parser.add_argument("--pgbench-seconds", type=bounded_int(1, 600), default=10)
    parser.add_argument("--seed", type=int, default=1)
    pipeline = parser.add_argument_group("pipeline")
    pipeline.add_argument("--workers", type=bounded_int(1, 16), default=2,
                          help="pipeline and e2e: worker processes")  # fmt: skip
    pipeline.add_argument("--lag-seconds", type=bounded_int(1, 600), default=10)
    pipeline.add_argument(
        "--rate-share",
        type=bounded_int(1, 100),
        default=60,
        help="offered rate for the lag run, in %% of measured capacity",
    )
    parser.add_argument("--api-workers", type=bounded_int(1, 8), default=None,
                        help="api and e2e: API processes (default 1 for api, 2 for e2e:"
                             " 2 beat 1 on 2 cores, docs/benchmarks.md)")  # fmt: skip
    api = parser.add_argument_group("api")
    api.add_argument("--users", type=bounded_int(2, 10_000), default=200)
    api.add_argument("--seconds", type=bounded_int(1, 600), default=10, help="throughput run")
    api.add_argument(
        "--rate", type=bounded_int(1, 5_000), default=100, help="payments/s, flood run"
    )
    api.add_argument("--flood", type=bounded_int(1, 512), default=16, help="sign-in loops")
    api.add_argument("--windows", type=bounded_int(1, 40), default=8, help="pairs of windows")
    api.add_argument("--window-seconds", type=bounded_int(1, 120), default=4)
    e2e = parser.add_argument_group("e2e")
    e2e.add_argument("--accounts-e2e", type=bounded_int(100, 100_000), default=2000,
                     help="accounts the users sign in as")  # fmt: skip
    e2e.add_argument("--hold-seconds", type=bounded_int(5, 600), default=60)
    e2e.add_argument("--ramp-seconds", type=bounded_int(1, 120), default=20)
    e2e.add_argument("--steps", default="10,20,40,60,80,100",
                     help="capacity profile: users per step")  # fmt: skip
    e2e.add_argument("--step-seconds", type=bounded_int(5, 120), default=15)
    e2e.add_argument("--profiles", default="seed,capacity,recovery")
    e2e.add_argument("--out", default="bench-e2e", help="folder for report.md/.json and PNGs")
    e2e.add_argument("--readme", help="write the Performance section of this README")
    proxy = parser.add_argument_group("proxy")
    proxy.add_argument("--pairs", type=bounded_int(1, 20), default=3,
                       help="pairs of pgbench windows (direct, proxied) per workload")  # fmt: skip


def _bench(config: Config, args: argparse.Namespace) -> int:
    if args.accounts is not None and args.accounts < 3:
        raise UsageError("--accounts must be at least 3")
    benches = {"ledger": _ledger, "pipeline": _pipeline, "api": _api, "proxy": _proxy,
               "e2e": _e2e}  # fmt: skip
    report, text = benches[args.name](config, args)
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
        api_workers=args.api_workers or ApiBenchParams.api_workers,
    )
    report = run(params)
    return report, table(report)


def _e2e(_config: Config, args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    from kizo.bench_e2e import E2eParams, run, table

    try:
        steps = tuple(int(n) for n in args.steps.split(","))
    except ValueError:
        raise UsageError("--steps must be user counts separated by commas") from None
    profiles = tuple(args.profiles.split(","))
    if not steps or min(steps) < 1 or max(steps) > 1000:
        raise UsageError("--steps: each from 1 to 1000 users")
    if not set(profiles) <= {"seed", "capacity", "recovery"}:
        raise UsageError("--profiles: any of seed, capacity, recovery, comma-separated")
    params = E2eParams(
        users=args.accounts_e2e, ramp_s=args.ramp_seconds, hold_s=args.hold_seconds,
        steps=steps, step_s=args.step_seconds,
        api_workers=args.api_workers or E2eParams.api_workers, workers=args.workers,
        profiles=profiles, out=args.out,
    )  # fmt: skip
    report = run(params)
    if args.readme:
        from pathlib import Path

        from kizo.bench_e2e import readme_section, write_readme

        write_readme(Path(args.readme), readme_section(report))
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
