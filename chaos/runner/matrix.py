"""``kizo chaos run --all [--seeds 1,2,3]``: every scenario with each seed, one run after the
other (each bounded by its own scenario), each writing its journal and chart under the out
directory; then one table, printed and written as ``all.json`` there. Exit 1 when any run
failed (violations, steps failed, or a run that could not be made at all), 2 on bad usage.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from infra.commands import UsageError
from infra.config import Config

SEEDS_MAX = 20
SUMMARY = "all.json"
COLUMNS = (("scenario", "<"), ("seed", ">"), ("ops", ">"), ("violations", ">"),
           ("steps failed", ">"), ("convergence s", ">"), ("lag p99 ms", ">"),
           ("verdict", "<"))  # fmt: skip


def parse_seeds(raw: str | None) -> list[int]:
    """``1,2,3`` -> [1, 2, 3]; a bad list is a ``UsageError``."""
    if raw is None:
        return [1, 2, 3]
    words = [w.strip() for w in raw.split(",")]
    if not all(w.isdigit() for w in words):
        raise UsageError(f"--seeds takes seeds separated by commas, e.g. 1,2,3, not {raw!r}")
    seeds = [int(w) for w in words]
    if len(seeds) > SEEDS_MAX or len(set(seeds)) != len(seeds) or max(seeds) >= 2**31:
        raise UsageError(f"--seeds takes at most {SEEDS_MAX} different seeds below 2^31")
    return seeds


def main(args: argparse.Namespace, out: Path, caller: Config | None = None) -> int:
    if not args.all:
        raise UsageError("--seeds goes with kizo chaos run --all")
    if args.what != "run" or args.scenario:
        raise UsageError("--all goes with kizo chaos run and no scenario name")
    seeds = parse_seeds(args.seeds)
    from chaos.runner import scenario as scenarios

    started = time.monotonic()
    rows = []
    for name in scenarios.names():
        for seed in seeds:
            rows.append(run_one(name, seed, args.mutation, out, caller))
            if not args.json:
                print(format_row(rows[-1]), flush=True)
    summary = {"seeds": seeds, "mutation": args.mutation or None,
               "took_s": round(time.monotonic() - started, 1), "runs": rows}  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / SUMMARY).write_text(json.dumps(summary, indent=1) + "\n")
    if args.json:
        print(json.dumps(summary))
    else:
        print(table(rows))
        print(f"{sum(r['verdict'] != 'pass' for r in rows)} of {len(rows)} runs failed "
              f"in {summary['took_s']} s; {out / SUMMARY}")  # fmt: skip
    return 1 if any(r["verdict"] != "pass" for r in rows) else 0


def run_one(name: str, seed: int, mutation: str, out: Path,
            caller: Config | None = None) -> dict[str, Any]:  # fmt: skip
    """One run; a run that could not be made at all (its system did not start, ...) is a row
    whose verdict says why, and the matrix goes on."""
    from chaos.runner import report_dir, run
    from chaos.runner import scenario as scenarios

    try:
        scenario = scenarios.load(name, seed)
        report = run(scenario.workload, scenario, seed, mutation,
                     report_dir(out, name, seed, mutation), caller)  # fmt: skip
    except Exception as exc:  # the matrix outlives one broken run, and names it
        first_line = (str(exc).splitlines() or [""])[0][:120]
        return {"scenario": name, "seed": seed, "ops": None, "violations": None,
                "steps_failed": None, "convergence_s": None, "lag_p99_ms": None,
                "verdict": f"error: {type(exc).__name__}: {first_line}",
                "journal": None}  # fmt: skip
    return row(report)


def row(report: Mapping[str, Any]) -> dict[str, Any]:
    """A run's line in the table."""
    return {
        "scenario": report["scenario"],
        "seed": report["seed"],
        "ops": report["ops"],
        "violations": report["violations"],
        "steps_failed": len(report["steps_failed"]),
        "convergence_s": report["convergence"]["seconds"],
        "lag_p99_ms": report["figures"]["lag_ms"]["p99"],
        "verdict": report["checker"]["verdict"],
        "journal": report.get("files", {}).get("journal"),
    }


def _cells(r: Mapping[str, Any]) -> list[str]:
    def cell(value: object, digits: int = 0) -> str:
        if value is None:
            return "-"
        return f"{value:.{digits}f}" if isinstance(value, float) else str(value)

    return [str(r["scenario"]), cell(r["seed"]), cell(r["ops"]), cell(r["violations"]),
            cell(r["steps_failed"]), cell(r["convergence_s"], 2), cell(r["lag_p99_ms"]),
            str(r["verdict"])]  # fmt: skip


def format_row(r: Mapping[str, Any]) -> str:
    """One line as a run ends (the table at the end aligns them)."""
    return "  ".join(f"{h} {c}" for (h, _), c in zip(COLUMNS, _cells(r), strict=True))


def table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows aligned under their headers, numbers to the right."""
    cells = [_cells(r) for r in rows]
    widths = [max([len(h), *(len(c[i]) for c in cells)]) for i, (h, _) in enumerate(COLUMNS)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(f"{v:{align}{w}}" for v, (_, align), w in
                         zip(values, COLUMNS, widths, strict=True)).rstrip()  # fmt: skip

    return "\n".join([line([h for h, _ in COLUMNS]), line(["-" * w for w in widths]),
                      *(line(c) for c in cells)])  # fmt: skip
