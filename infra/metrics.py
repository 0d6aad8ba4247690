"""What every process's metrics share: buckets, the exposition (single- or multiprocess), the
label bounds, and the file_sd target files through which Prometheus finds the processes.

docs/observability.md is the catalogue; the metrics themselves live beside the code they
measure. The API runs under granian, possibly as several processes behind one port, so it uses
prometheus-client's multiprocess mode (``use_multiprocess_dir`` before its workers start); every
other process serves its own registry on a port of its own.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# The library's own switch: set, every metric of the process lives in files in that directory.
MULTIPROC_VAR = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
LAG_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
                 600.0, 1800.0)  # fmt: skip
SIZE_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0)
HTTP_METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"})
FAILURE_REASONS = frozenset({"insufficient_funds", "bank_declined"})
KINDS = frozenset({"deposit", "withdrawal", "transfer"})


def method_label(method: str) -> str:
    return method if method in HTTP_METHODS else "other"


def reason_label(reason: str | None) -> str:
    """A failure reason as a label: the ones we name, else ``other`` (a bank may say anything)."""
    return reason if reason in FAILURE_REASONS else "other"


def kind_label(kind: str) -> str:
    return kind if kind in KINDS else "other"


def use_multiprocess_dir(path: Path) -> None:
    """Empty ``path`` and make it this process's (and its children's) multiprocess directory.
    Call before prometheus_client is imported anywhere in the process: the library picks its
    value store at import time. Emptied because files left by an earlier run would be summed
    into this one's counters."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    os.environ[MULTIPROC_VAR] = str(path)


def exposition() -> bytes:
    """The process's metrics in Prometheus text format: in multiprocess mode, those of every
    process writing to the directory, aggregated; else the default registry's."""
    from prometheus_client import REGISTRY, CollectorRegistry, generate_latest

    if os.environ.get(MULTIPROC_VAR):
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
    return generate_latest(REGISTRY)


@dataclass(frozen=True)
class Target:
    """One process Prometheus should scrape: its role, its name, its metrics URL's host:port."""

    role: str
    process: str
    address: str  # host:port; the path is always /metrics


def targets_dir(home: Path) -> Path:
    return home / "prometheus" / "targets"


def write_targets(path: Path, targets: Sequence[Target], system: str) -> None:
    """Write a file_sd file atomically: Prometheus never reads half of one."""
    groups = [
        {"targets": [t.address],
         "labels": {"role": t.role, "process": t.process, "system": system}}
        for t in targets
    ]  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(groups, indent=1) + "\n")
    tmp.replace(path)


def remove_targets(path: Path) -> None:
    path.unlink(missing_ok=True)
