"""Greedy shrinking, as Hypothesis's shrinker does it: try simpler candidates in a fixed order
(fewer windows, a smaller workload, shorter and earlier windows, plainer parameters), keep the
first that still fails, start over from it; stop when none does or the runs run out."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

from chaos.explorer._faults import KINDS, Window
from chaos.explorer._generate import (
    LENGTH_S_MIN,
    OPS,
    PROCESSES,
    START_S_MIN,
    USERS,
    Candidate,
    grid,
    valid,
)


@dataclass(frozen=True)
class Shrunk:
    candidate: Candidate
    runs: int  # candidates tried (each a run of the predicate)
    kept: int  # of which still failed, each the new smallest
    # start, then every candidate kept, in order (the last is ``candidate``): where to step
    # back to when the smallest does not fail again (a race that a smaller workload rarely hits)
    path: tuple[Candidate, ...] = ()


def shrink(start: Candidate, still_fails: Callable[[Candidate], bool], runs_max: int,
           more: Callable[[], bool] = lambda: True) -> Shrunk:  # fmt: skip
    """The smallest candidate found that ``still_fails``, trying at most ``runs_max`` and only
    while ``more()`` (the time budget) says so. ``start`` is taken as failing; a candidate that
    passes once is dropped (runs are noisy: the caller confirms the result)."""
    best, runs, kept = start, 0, 0
    path = [start]
    tried = {start}
    progress = True
    while progress:
        progress = False
        for candidate in simpler(best):
            if candidate in tried or not valid(candidate):
                continue
            if runs >= runs_max or not more():
                return Shrunk(best, runs, kept, tuple(path))
            tried.add(candidate)
            runs += 1
            if still_fails(candidate):
                best, kept, progress = candidate, kept + 1, True
                path.append(candidate)
                break
    return Shrunk(best, runs, kept, tuple(path))


def simpler(c: Candidate) -> Iterator[Candidate]:
    """Candidates simpler than ``c``, the biggest cuts first."""
    yield from _fewer_windows(c)
    yield from _smaller_workload(c)
    for i, w in enumerate(c.windows):
        for smaller in _shorter_and_earlier(w):
            yield _with(c, i, smaller)
    for i, w in enumerate(c.windows):
        for plainer in KINDS[w.kind].simpler(w):
            yield _with(c, i, plainer)


def _with(c: Candidate, i: int, w: Window) -> Candidate:
    return replace(c, windows=(*c.windows[:i], w, *c.windows[i + 1 :]))


def _fewer_windows(c: Candidate) -> Iterator[Candidate]:
    n = len(c.windows)
    if n == 0:
        return
    yield replace(c, windows=())
    if n >= 2:
        half = n // 2
        yield replace(c, windows=c.windows[half:])
        yield replace(c, windows=c.windows[:half])
    for i in range(n):
        yield replace(c, windows=(*c.windows[:i], *c.windows[i + 1 :]))


def _smaller_workload(c: Candidate) -> Iterator[Candidate]:
    yield replace(c, users=USERS[0], processes=PROCESSES[0], ops=OPS[0], hot_share=0.0)
    for name, low in (("users", USERS[0]), ("processes", PROCESSES[0]), ("ops", OPS[0])):
        value: int = getattr(c, name)
        for smaller in dict.fromkeys((low, low + (value - low) // 2)):
            if smaller < value:
                change: dict[str, Any] = {name: smaller}
                yield replace(c, **change)
    if c.hot_share:
        yield replace(c, hot_share=0.0)


def _shorter_and_earlier(w: Window) -> Iterator[Window]:
    length_s = w.end_s - w.start_s
    for shorter_s in (LENGTH_S_MIN, grid(length_s / 2)):
        if LENGTH_S_MIN <= shorter_s < length_s - 1e-9:
            yield replace(w, end_s=grid(w.start_s + shorter_s))
    for earlier_s in (START_S_MIN, grid((START_S_MIN + w.start_s) / 2)):
        if START_S_MIN <= earlier_s < w.start_s - 1e-9:
            yield replace(w, start_s=earlier_s, end_s=grid(earlier_s + length_s))
