"""What the operations console shows (docs/web.md), gathered for the admin routes.

Three kinds of source, each bounded and each allowed to be missing:
- the database, read by this process: open intents and the oldest one's age (the partial index
  ``transactions_open_idx``), intents flagged needs_attention, open reconciliation findings;
- the janitor's and the workers' own ``/metrics`` (Prometheus text): janitor passes by result,
  the last pass, queue depth per shard, settlement lag since each worker started;
- the fault proxy's Toxiproxy API (its proxies and toxics) and the journals ``kizo chaos run``
  leaves on disk.
An outside source that does not answer within ``SCRAPE_TIMEOUT_S`` is reported as unreachable:
the console still shows the rest, and no admin route ever fails because a side process is down.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from prometheus_client.parser import text_string_to_metric_families

from infra.config import Config

SCRAPE_TIMEOUT_S = 1.0
METRICS_BYTES_MAX = 2 * 1024 * 1024
CHAOS_RUNS_MAX = 20
JOURNAL_BYTES_MAX = 20 * 1024 * 1024
PROXIES_MAX = 100
Samples = dict[str, list[tuple[dict[str, str], float]]]  # by name: (labels, value)
_OPEN_SQL = (
    "SELECT count(*) AS open, extract(epoch FROM now() - min(created_at))::float8 AS oldest_s"
    " FROM transactions WHERE status IN ('pending', 'processing')"
)


async def backlog(pool: asyncpg.Pool) -> dict[str, Any]:
    row = await pool.fetchrow(_OPEN_SQL, timeout=5)
    assert row is not None
    oldest = row["oldest_s"]
    return {"open": row["open"], "oldest_open_age_s": None if oldest is None else round(oldest, 3)}


async def _scrape(http: httpx.AsyncClient, url: str) -> Samples:
    """The samples of one process's /metrics; raises on any failure."""
    response = await http.get(url, timeout=SCRAPE_TIMEOUT_S)
    response.raise_for_status()
    if len(response.content) > METRICS_BYTES_MAX:
        raise ValueError("metrics page too large")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def _total(samples: Samples, name: str) -> float | None:
    found = samples.get(name)
    return None if not found else sum(value for _labels, value in found)


def _by(samples: Samples, name: str, label: str) -> dict[str, int]:
    return {labels.get(label, ""): int(value) for labels, value in samples.get(name, [])}


async def janitor(http: httpx.AsyncClient, config: Config) -> dict[str, Any]:
    url = f"http://{config.host}:{config.pipeline.janitor_metrics_port}/metrics"
    try:
        samples = await _scrape(http, url)
    except (httpx.HTTPError, ValueError) as exc:
        return {"reachable": False, "error": type(exc).__name__}
    last = _total(samples, "kizo_janitor_last_pass_timestamp_seconds")
    depth = _by(samples, "kizo_queue_depth", "shard")
    return {
        "reachable": True,
        "passes": _by(samples, "kizo_janitor_passes_total", "result"),
        "last_pass_age_s": None if not last else round(max(0.0, time.time() - last), 1),
        "findings": _by(samples, "kizo_janitor_findings", "kind"),
        "unresolved": int(_total(samples, "kizo_janitor_unresolved") or 0),
        "queued": sum(depth.values()),
        "queue_depth": dict(sorted(depth.items())),
    }


def quantile(buckets: dict[float, float], q: float) -> float | None:
    """The upper bound of the bucket where the cumulative count reaches ``q`` of the total (what
    Prometheus' histogram_quantile would interpolate within; an upper bound is the honest
    reading of a bucket). None without observations; inf past the last finite bucket."""
    if not buckets:
        return None
    total = buckets.get(math.inf, max(buckets.values()))
    if total <= 0:
        return None
    for bound in sorted(buckets):
        if buckets[bound] >= q * total:
            return bound
    return math.inf


async def settlement_lag(http: httpx.AsyncClient, config: Config) -> dict[str, Any]:
    """Settlement lag (accepted to final) of every worker since it started, from their
    ``kizo_settlement_lag_seconds`` histograms, summed."""
    ports = [config.pipeline.worker_metrics_port + i for i in range(config.workers)]
    answers = await asyncio.gather(
        *(_scrape(http, f"http://{config.host}:{port}/metrics") for port in ports),
        return_exceptions=True,
    )
    buckets: dict[float, float] = {}
    reachable = 0
    for answer in answers:
        if isinstance(answer, BaseException):
            continue
        reachable += 1
        for labels, value in answer.get("kizo_settlement_lag_seconds_bucket", []):
            bound = float(labels.get("le", "inf"))
            buckets[bound] = buckets.get(bound, 0.0) + value
    return {
        "workers": len(ports),
        "reachable": reachable,
        "count": int(buckets.get(math.inf, 0)),
        "p50_s": _finite(quantile(buckets, 0.5)),
        "p99_s": _finite(quantile(buckets, 0.99)),
    }


def _finite(value: float | None) -> float | str | None:
    return "+Inf" if value == math.inf else value


async def faults(http: httpx.AsyncClient, config: Config) -> dict[str, Any]:
    """The fault proxy's proxies with their toxics; a disabled proxy or any toxic is a fault."""
    url = f"http://{config.host}:{config.proxy_api_port}/proxies"
    try:
        response = await http.get(url, timeout=SCRAPE_TIMEOUT_S)
        response.raise_for_status()
        proxies = response.json()
        if not isinstance(proxies, dict):
            raise ValueError("not a proxy map")
    except (httpx.HTTPError, ValueError) as exc:
        return {"reachable": False, "error": type(exc).__name__, "proxies": []}
    items = [_proxy(name, p) for name, p in sorted(proxies.items())[:PROXIES_MAX]
             if isinstance(p, dict)]  # fmt: skip
    return {"reachable": True, "proxies": items,
            "active": sum(1 for p in items if not p["enabled"]) + sum(len(p["toxics"])
                                                                    for p in items)}  # fmt: skip


def _proxy(name: str, proxy: dict[str, Any]) -> dict[str, Any]:
    toxics = proxy.get("toxics") if isinstance(proxy.get("toxics"), list) else []
    return {
        "name": str(name),
        "enabled": bool(proxy.get("enabled", True)),
        "listen": str(proxy.get("listen", "")),
        "upstream": str(proxy.get("upstream", "")),
        "toxics": [{"name": str(t.get("name", "")), "type": str(t.get("type", "")),
                    "stream": str(t.get("stream", "")),
                    "toxicity": float(t.get("toxicity", 1.0)),
                    "attributes": {str(k): v for k, v in (t.get("attributes") or {}).items()
                                   if isinstance(v, int | float | str | bool)}}
                   for t in toxics or [] if isinstance(t, dict)],
    }  # fmt: skip


def chaos_runs(root: Path, limit: int = CHAOS_RUNS_MAX) -> list[dict[str, Any]]:
    """The newest journals under ``root`` (``<run>/journal.json``), newest first; blocking file
    reads, so callers run it in a thread."""
    journals: list[tuple[float, Path]] = []
    for path in _journals(root):
        try:
            journals.append((path.stat().st_mtime, path))
        except OSError:
            continue
    runs = []
    for mtime, path in sorted(journals, reverse=True)[:limit]:
        run = _run(path, mtime)
        if run is not None:
            runs.append(run)
    return runs


def _journals(root: Path) -> Iterable[Path]:
    try:
        return [d / "journal.json" for d in root.iterdir() if (d / "journal.json").is_file()]
    except OSError:
        return []


def _run(path: Path, mtime: float) -> dict[str, Any] | None:
    try:
        if path.stat().st_size > JOURNAL_BYTES_MAX:
            return None
        journal = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(journal, dict):
        return None
    checker, convergence = _section(journal, "checker"), _section(journal, "convergence")
    lag = _section(_section(journal, "figures"), "lag_ms")
    return {
        "run": path.parent.name,
        "scenario": _text(journal.get("scenario")) or "bank workload",
        "seed": journal.get("seed") if isinstance(journal.get("seed"), int) else None,
        "mutation": _text(journal.get("mutation")),
        "verdict": _text(checker.get("verdict")) or "unknown",
        "violations": _int(checker.get("violations", journal.get("violations"))),
        "lag_p99_ms": _number(lag.get("p99")),
        "convergence_s": _number(convergence.get("seconds")),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(mtime)),
    }


def _section(journal: dict[str, Any], name: str) -> dict[str, Any]:
    value = journal.get(name)
    return value if isinstance(value, dict) else {}


def _text(value: object) -> str | None:
    return value[:200] if isinstance(value, str) and value else None


def _int(value: object) -> int | None:
    if isinstance(value, list):
        return len(value)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _number(value: object) -> float | None:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    return float(value) if ok and math.isfinite(float(value)) else None  # type: ignore[arg-type]


def grafana(config: Config) -> str | None:
    """KIZO_GRAFANA_URL when it is an http(s) URL: the console links to it, nothing else."""
    url = config.grafana_url.strip()
    return url.rstrip("/") if url.startswith(("http://", "https://")) else None
