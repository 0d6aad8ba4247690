"""A scenario's steady-state hypothesis: probes of the live system, each with a tolerance.

As in Chaos Toolkit, the hypothesis says what "the system is fine" looks like, and is probed
before the method (once the workload's users exist and are funded) and after the rollbacks,
healing and convergence. A deviation before means the system was not in steady state, so the
method does not run; a deviation after fails the run. The same probes can be method steps
(``action = "probe"``), to assert that a fault did what it was meant to do.

The providers are a closed set Kizo knows how to probe, each giving one integer:

    api_ready        GET /ready of the API: its status code (200 when PostgreSQL and Redis answer)
    bank_health      GET /health of the bank itself (not through the proxy): its status code
    ledger_audit     how many findings the ledger's own audit checks report (engine.audit)
    unsettled        transactions still pending or processing, created more than
                     ``arguments.older_than_s`` (default 0) seconds ago
    needs_attention  pending intents the janitor flagged needs_attention
    open_findings    open rows of reconciliation_findings (the janitor's findings)

An HTTP probe that gets no answer gives 0. A tolerance is an exact value (for the HTTP
providers: the status code) or an inclusive ``[min, max]`` range. The SQL probes are read-only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx
import trio

PROVIDERS = ("api_ready", "bank_health", "ledger_audit", "unsettled", "needs_attention",
             "open_findings")  # fmt: skip
HTTP_PROVIDERS = frozenset({"api_ready", "bank_health"})
ARGUMENTS = {"unsettled": frozenset({"older_than_s"})}
PROBE_TIMEOUT_S = 10.0
VALUE_MAX = 10**9


class HypothesisError(ValueError):
    """A hypothesis or probe that cannot be probed: one line saying why."""


@dataclass(frozen=True)
class Probe:
    name: str
    provider: str
    tolerance: int | tuple[int, int]
    arguments: Mapping[str, float] = field(default_factory=dict)

    def within(self, value: int) -> bool:
        if isinstance(self.tolerance, int):
            return value == self.tolerance
        low, high = self.tolerance
        return low <= value <= high

    def describe_tolerance(self) -> str:
        t = self.tolerance
        return f"== {t}" if isinstance(t, int) else f"in [{t[0]}, {t[1]}]"


@dataclass(frozen=True)
class Hypothesis:
    title: str
    probes: tuple[Probe, ...]


# When a file has none: the API is ready, the bank healthy, the ledger's audit clean and nothing
# waits for an operator. Each holds on a fresh system, and must hold again once it has healed.
DEFAULT = Hypothesis(
    "The API is ready, the bank healthy, the ledger clean, nothing needs an operator",
    (
        Probe("the API is ready", "api_ready", 200),
        Probe("the bank is healthy", "bank_health", 200),
        Probe("the ledger's audit is clean", "ledger_audit", 0),
        Probe("nothing needs attention", "needs_attention", 0),
    ),
)


def parse_hypothesis(raw: object, where: str) -> Hypothesis:
    if raw is None:
        return DEFAULT
    if not isinstance(raw, dict) or not set(raw) <= {"title", "probes"}:
        raise HypothesisError(f"{where}: [steady-state-hypothesis] takes only title and probes")
    title, probes = raw.get("title"), raw.get("probes")
    if not isinstance(title, str) or not title:
        raise HypothesisError(f"{where}: steady-state-hypothesis.title must be a non-empty string")
    if not isinstance(probes, list) or not probes or not all(isinstance(p, dict) for p in probes):
        raise HypothesisError(
            f"{where}: steady-state-hypothesis needs [[steady-state-hypothesis.probes]]"
        )
    return Hypothesis(title, tuple(
        parse_probe(p, f"{where} steady-state-hypothesis.probes[{i}]")
        for i, p in enumerate(probes)
    ))  # fmt: skip


def parse_probe(raw: Mapping[str, Any], where: str) -> Probe:
    if not set(raw) <= {"name", "provider", "tolerance", "arguments"}:
        raise HypothesisError(f"{where}: a probe takes only name, provider, tolerance, arguments")
    name, provider = raw.get("name"), raw.get("provider")
    if not isinstance(name, str) or not name:
        raise HypothesisError(f"{where}: name must be a non-empty string")
    if provider not in PROVIDERS:
        raise HypothesisError(
            f"{where}: unknown provider {provider!r} (one of {', '.join(PROVIDERS)})"
        )
    return Probe(name, provider, _tolerance(raw.get("tolerance"), provider, where),
                 _arguments(raw.get("arguments", {}), provider, where))  # fmt: skip


def _tolerance(raw: object, provider: str, where: str) -> int | tuple[int, int]:
    if provider in HTTP_PROVIDERS:
        code = _count(raw)
        if code is None or not 100 <= code <= 599:
            raise HypothesisError(f"{where}: {provider} takes a status code (100-599) as tolerance")
        return code
    exact = _count(raw)
    if exact is not None:
        return exact
    if isinstance(raw, list) and len(raw) == 2:
        low, high = _count(raw[0]), _count(raw[1])
        if low is not None and high is not None and low <= high:
            return low, high
    raise HypothesisError(
        f"{where}: tolerance must be a count (0 to {VALUE_MAX}) or a range [min, max], min <= max"
    )


def _count(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= VALUE_MAX:
        return value
    return None


def _arguments(raw: object, provider: str, where: str) -> dict[str, float]:
    allowed = ARGUMENTS.get(provider, frozenset())
    if not isinstance(raw, dict) or not set(raw) <= allowed:
        takes = ", ".join(sorted(allowed)) or "no arguments"
        raise HypothesisError(f"{where}: {provider} takes {takes}")
    for key, value in raw.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 3600:
            raise HypothesisError(f"{where}: arguments.{key} must be seconds from 0 to 3600")
    return {k: float(v) for k, v in raw.items()}


@dataclass(frozen=True)
class Prober:
    """Probes one running system: its API, its bank (directly) and its database."""

    api_url: str
    bank_url: str
    database_url: str

    async def value(self, probe: Probe) -> int:
        if probe.provider in HTTP_PROVIDERS:
            url = (
                f"{self.api_url}/ready"
                if probe.provider == "api_ready"
                else f"{self.bank_url}/health"
            )
            try:
                async with httpx.AsyncClient(timeout=PROBE_TIMEOUT_S) as http:
                    return (await http.get(url)).status_code
            except httpx.HTTPError:
                return 0
        # asyncpg is asyncio's: one short-lived loop in a worker thread per SQL probe keeps it
        # apart from the workload's trio (and from any trio-asyncio loop it opens).
        return await trio.to_thread.run_sync(asyncio.run, _sql_value(self.database_url, probe))

    async def run(self, probes: Sequence[Probe]) -> list[dict[str, Any]]:
        """Each probe's value and whether it was within tolerance (an error is a deviation)."""
        results = []
        for probe in probes:
            try:
                value: int | None = await self.value(probe)
                error = None
            except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
                value, error = None, f"{exc.__class__.__name__}: {exc}"[:200]
            results.append({
                "name": probe.name, "provider": probe.provider,
                "tolerance": probe.describe_tolerance(), "value": value,
                "ok": value is not None and probe.within(value),
                **({"error": error} if error else {}),
            })  # fmt: skip
        return results


_COUNTS = {
    "unsettled": "SELECT count(*) FROM transactions WHERE status IN ('pending', 'processing')"
    " AND created_at < now() - make_interval(secs => $1)",
    "needs_attention": "SELECT count(*) FROM transactions"
    " WHERE needs_attention AND status = 'pending'",
    "open_findings": "SELECT count(*) FROM reconciliation_findings WHERE resolved_at IS NULL",
}


async def _sql_value(database_url: str, probe: Probe) -> int:
    from engine import audit

    conn = await asyncpg.connect(database_url, timeout=PROBE_TIMEOUT_S)
    try:
        # One snapshot for every check: settlement goes on while the system is probed.
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            if probe.provider == "ledger_audit":
                return len(await audit(conn))
            args = (
                [probe.arguments.get("older_than_s", 0.0)] if probe.provider == "unsettled" else []
            )
            return int(await conn.fetchval(_COUNTS[probe.provider], *args, timeout=PROBE_TIMEOUT_S))
    finally:
        await conn.close()


def lines(report: Mapping[str, Any]) -> list[str]:
    """The readable summary's lines for a run's hypothesis (``report["hypothesis"]``), its
    rollbacks and its convergence."""
    hyp = report.get("hypothesis")
    if not hyp:
        return []
    out = [f"  steady state      {hyp['title']}"]
    after = {p["name"]: p for p in hyp.get("after", [])}
    for before in hyp["before"]:
        later = after.get(before["name"])
        shown = f"before {_shown(before)}" + (f", after {_shown(later)}" if later else "")
        out.append(f"    {before['name']:<46} {before['tolerance']:<14} {shown}")
    out += [f"    {r}" for r in hyp.get("failed", [])]
    if report.get("rollbacks"):
        done = ", ".join(f"{r['step']} -> {r['status']}" for r in report["rollbacks"])
        out.append(f"  rollbacks         {done}, then heal")
    return out


def _shown(result: Mapping[str, Any]) -> str:
    value = result.get("error") if result["value"] is None else result["value"]
    return f"{value} {'ok' if result['ok'] else 'DEVIATES'}"


def deviations(results: Sequence[Mapping[str, Any]]) -> list[str]:
    return [f"{r['name']}: {r['provider']} = {r['value']}, expected {r['tolerance']}"
            for r in results if not r["ok"]]  # fmt: skip
