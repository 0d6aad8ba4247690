"""``kizo chaos bank``: the Jepsen-style bank workload and its checker, on a scratch system.

Exit code 0 when the checker finds nothing, 1 when it finds violations (they are printed),
2 on bad usage. ``--mutation`` runs a deliberately broken build, to see the checker fail.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from typing import Any

from kizo.cli import Command, bounded_int, register
from kizo.config import MUTATIONS, Config

VIOLATIONS_SHOWN_MAX = 20


def _configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("workload", choices=["bank"], help="what to run")
    parser.add_argument("--seed", type=bounded_int(0, 2**31), default=1)
    parser.add_argument("--users", type=bounded_int(2, 500), default=12)
    parser.add_argument("--processes", type=bounded_int(1, 64), default=8)
    parser.add_argument("--ops", type=bounded_int(1, 10_000), default=120,
                        help="operations per process")  # fmt: skip
    parser.add_argument("--mutation", choices=[m for m in MUTATIONS if m], default="",
                        help="run a deliberately broken build")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _chaos(_config: Config, args: argparse.Namespace) -> int:
    import trio

    from chaos import bank_workload as workload
    from chaos.checker import check
    from kizo.system import scratch_system

    params = workload.WorkloadParams(users=args.users, processes=args.processes,
                                     ops_per_process=args.ops, seed=args.seed)  # fmt: skip
    overrides = {"KIZO_RATE_LIMITS": "off", "KIZO_JANITOR_INTERVAL_S": "1"}
    if args.mutation:
        overrides["KIZO_MUTATION"] = args.mutation

    async def main(api_url: str, database_url: str, bank_url: str) -> dict[str, Any]:
        started = time.monotonic()
        history, members = await workload.run(api_url, params)
        ran_s = time.monotonic() - started
        state = await workload.converge_and_read(api_url, database_url, members, params, bank_url)
        violations = check(history, state)
        return {
            "seed": args.seed,
            "mutation": args.mutation or None,
            "ops": len(history),
            "ops_per_s": round(len(history) / ran_s, 1),
            "by_kind_and_status": dict(
                sorted(Counter(f"{op.f} {op.status}" for op in history).items())
            ),
            "transactions": len(state.transactions),
            "violations": len(violations),
            "violation_rules": dict(Counter(v.rule for v in violations)),
            "violations_shown": [f"{v.rule}: {v.detail}" for v in violations][
                :VIOLATIONS_SHOWN_MAX
            ],
        }

    with scratch_system(overrides) as system:
        report = trio.run(main, system.api_url, system.database_url, system.bank_url)
    print(json.dumps(report) if args.json else _text(report))
    return 1 if report["violations"] else 0


def _text(report: dict[str, Any]) -> str:
    lines = [
        f"kizo chaos bank (seed {report['seed']}"
        + (f", mutation {report['mutation']}" if report["mutation"] else "")
        + ")",
        f"  operations        {report['ops']} ({report['ops_per_s']}/s)",
        f"  transactions      {report['transactions']}",
    ]
    lines += [f"    {k:<28} {n}" for k, n in report["by_kind_and_status"].items()]
    lines.append(f"  violations        {report['violations']}")
    lines += [f"    {rule:<28} {n}" for rule, n in sorted(report["violation_rules"].items())]
    if report["violations_shown"]:
        lines.append(f"  first {len(report['violations_shown'])}:")
    lines += [f"    {v}" for v in report["violations_shown"]]
    return "\n".join(lines)


register(Command("chaos", "run the bank workload and check it (Jepsen-style)", _chaos, _configure))
