"""A chaos run's chart (PNG), drawn from its journal alone (``chaos.runner.report``): four panels on
one time axis (throughput, errors, settlement lag, backlog), each fault window shaded in all of
them and labelled in the top one, the heal and the convergence marked. A gap in a series (a
server that did not answer the sampler) is a break in its line.

matplotlib's Agg backend: no display needed; imported only when a chart is drawn.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

WIDTH_IN, HEIGHT_IN, DPI = 11.0, 9.0, 90
WINDOW_COLOURS = ("#e4572e", "#4c72b0", "#8172b2", "#55a868", "#c44e52", "#dd8452", "#937860")
LABEL_ROWS = 5  # the windows' bars and labels are stacked on this many rows
ROW_HEIGHT = 0.11  # of the top panel's height


def _values(raw: Sequence[float | None]) -> list[float]:
    return [math.nan if v is None else float(v) for v in raw]


def _title(journal: Mapping[str, Any]) -> str:
    what = journal.get("scenario") or "bank workload"
    mutation = journal.get("mutation")
    checker = journal.get("checker", {})
    verdict = str(checker.get("verdict", "?")).upper()
    detail = f"{journal.get('violations', 0)} violations"
    if checker.get("steps_failed"):
        detail += f", {checker['steps_failed']} steps failed"
    return (f"{what} · seed {journal.get('seed')}" + (f" · mutation {mutation}" if mutation else "")
            + f" · {verdict} ({detail})")  # fmt: skip


def draw(journal: Mapping[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    series, samples = journal["series"], journal["samples"]
    t = series["t_s"]
    mid = [x + series["interval_s"] / 2 for x in t]  # a bin's value at its middle
    fig, axes = plt.subplots(4, 1, sharex=True, figsize=(WIDTH_IN, HEIGHT_IN), dpi=DPI,
                             layout="constrained")  # fmt: skip
    top, errors, lag, backlog = axes
    top.plot(mid, series["answered_per_s"], color="#2a6f97", lw=1.4, label="answered")
    top.set_ylabel("operations/s")
    errors.plot(mid, series["unknown_per_s"], color="#6c757d", lw=1.2, label="no answer")
    errors.plot(mid, series["errors_503_per_s"], color="#f4a261", lw=1.2, label="503")
    errors.plot(mid, series["errors_5xx_per_s"], color="#d62828", lw=1.6, label="other 5xx")
    errors.set_ylabel("errors/s")
    # Markers too: a bin whose neighbours settled nothing is a point, not a line.
    lag.plot(mid, _values(series["lag_p50_ms"]), color="#2a9d8f", lw=1.2, marker=".",
             label="p50 (of what settled then)")  # fmt: skip
    lag.plot(mid, _values(series["lag_p99_ms"]), color="#264653", lw=1.4, marker=".",
             label="p99")  # fmt: skip
    lag.set_ylabel("settlement lag ms")
    if any(v is not None and v > 0 for v in series["lag_p99_ms"]):
        lag.set_yscale("log")
    backlog.plot(samples["t_s"], _values(samples["backlog"]), color="#7b2cbf", lw=1.4,
                 label="open transactions")  # fmt: skip
    backlog.plot(samples["t_s"], _values(samples["queued"]), color="#c77dff", lw=1.2,
                 label="queued jobs")  # fmt: skip
    backlog.set_ylabel("backlog")
    half = journal.get("sampler", {}).get("interval_s", 0.5) / 2
    gaps = [t for t, b, q in zip(samples["t_s"], samples["backlog"], samples["queued"],
                                 strict=True) if b is None or q is None]  # fmt: skip
    for i, t_s in enumerate(gaps):
        label = "no sample (server down)" if i == 0 else None
        backlog.axvspan(t_s - half, t_s + half, facecolor="none", edgecolor="#6c757d",
                        hatch="///", lw=0, label=label)  # fmt: skip
    backlog.set_xlabel("seconds since the load started")
    _shade(axes, journal.get("fault_windows", []))
    _marks(axes, journal)
    for ax in axes:
        ax.grid(True, alpha=0.3)
        if ax.get_yscale() == "linear":
            ax.set_ylim(0, max(1.0, ax.get_ylim()[1]))  # all zero: 0..1, not matplotlib's ±0.05
        ax.legend(loc="center right" if ax is top else "best", fontsize=8, framealpha=0.8)
    # A run may end with no sample at all (the sampler never got an answer): still a chart.
    top.set_xlim(0, max([t[-1] + series["interval_s"] if t else 1.0, *samples["t_s"][-1:]]))
    fig.suptitle(_title(journal), fontsize=12, fontweight="bold")
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def _shade(axes: Sequence[Any], windows: Sequence[Mapping[str, Any]]) -> None:
    """Each window shaded in every panel, and in the top one a bar of its own colour from its
    start to its end with its label, one row per window (overlapping shades blend; the bars
    say which is which)."""
    top = axes[0]
    rows = min(len(windows), LABEL_ROWS)
    if rows:  # room above the data for the bars
        top.set_ylim(0, max(1.0, top.get_ylim()[1]) / (1 - ROW_HEIGHT * rows))
    for i, window in enumerate(windows):
        colour = WINDOW_COLOURS[i % len(WINDOW_COLOURS)]
        start, end = window["start_s"], max(window["end_s"], window["start_s"] + 0.05)
        for ax in axes:
            ax.axvspan(start, end, color=colour, alpha=0.10, lw=0)
        # In axes-fraction height, so the bars sit at the top whatever the data's range.
        y = 0.985 - ROW_HEIGHT * (i % LABEL_ROWS)
        top.plot([start, end], [y - ROW_HEIGHT + 0.025] * 2, color=colour, lw=3,
                 solid_capstyle="butt", transform=top.get_xaxis_transform())  # fmt: skip
        top.text(start, y, f"{window['label']}", color=colour, fontsize=8, fontweight="bold",
                 va="top", ha="left", transform=top.get_xaxis_transform(),
                 clip_on=True)  # fmt: skip


def _marks(axes: Sequence[Any], journal: Mapping[str, Any]) -> None:
    conv = journal.get("convergence") or {}
    healed = conv.get("healed_s")
    last = conv.get("last_final_s")
    for ax in axes:
        if healed is not None:
            ax.axvline(healed, color="#333333", ls="--", lw=1)
        if last is not None and conv.get("seconds") is not None:
            ax.axvline(max(last, healed or 0), color="#2b9348", ls=":", lw=1.4)
    top = axes[0]
    if healed is not None:
        top.text(healed, 0.04, " healed", transform=top.get_xaxis_transform(), fontsize=8,
                 va="bottom")  # fmt: skip
    if last is not None and conv.get("seconds") is not None:
        top.text(max(last, healed or 0), 0.16, f" all final (+{conv['seconds']:.1f} s)",
                 transform=top.get_xaxis_transform(), fontsize=8, va="bottom",
                 color="#2b9348")  # fmt: skip
