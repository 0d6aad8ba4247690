"""Drawing a candidate (a workload and a timeline of fault windows) from a seed, and writing it
as a scenario: chaos.runner.scenario Steps to run, or a TOML file that ``kizo chaos run`` loads."""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from chaos.explorer._faults import KINDS, Vocabulary, Window, lock
from chaos.runner.hypothesis import DEFAULT
from chaos.runner.scenario import Scenario, Step
from chaos.runner.workload import WorkloadParams

# A timeline short enough that a run takes seconds: every window starts and heals within
# METHOD_S_MAX, lasts LENGTH_S_MIN or more, and steps are drawn on a STEP_S grid.
WINDOWS_MAX = 4
START_S_MIN = 0.5
START_S_MAX = 6.0
LENGTH_S_MIN = 0.5
LENGTH_S_MAX = 4.0
METHOD_S_MAX = 8.0
STEP_S = 0.1
# Two windows of one lock (a process, a proxy's switch) keep this far apart: a restart waits
# for its process to serve before the next step of the same thing.
LOCK_GAP_S = 0.5
# A restart blocks the timeline until its process serves (seconds on a loaded machine): no
# other step within RESTART_GAP_S after it, so that none starts later than
# chaos.runner.scenario.STEP_LATE_S_MAX.
RESTART_GAP_S = 4.0
PLACE_TRIES_MAX = 20
# The workload, drawn small: (lowest when shrunk, lowest drawn, highest drawn).
USERS = (2, 3, 8)
PROCESSES = (1, 2, 6)
OPS = (5, 10, 40)
HOT_SHARES = (0.0, 0.0, 0.3, 0.6)


@dataclass(frozen=True)
class Candidate:
    """One scenario to try: its seed (the workload's and the bank's dice: ``--seed``), its
    workload and its fault windows."""

    seed: int
    users: int
    processes: int
    ops: int
    hot_share: float = 0.0
    windows: tuple[Window, ...] = field(default=())

    def summary(self) -> list[str]:
        return [w.describe() for w in self.windows]


def generate(seed: int, vocabulary: Vocabulary) -> Candidate:
    """The candidate of ``seed``: the same seed and vocabulary draw the same one."""
    rng = random.Random(seed)
    users = rng.randint(USERS[1], USERS[2])
    processes = rng.randint(PROCESSES[1], PROCESSES[2])
    ops = rng.randint(OPS[1], OPS[2])
    hot_share = rng.choice(HOT_SHARES)
    windows: list[Window] = []
    for _ in range(rng.randint(1, WINDOWS_MAX)):
        window = _draw_window(rng, vocabulary, windows)
        if window is not None:
            windows.append(window)
    windows.sort(key=lambda w: (w.start_s, w.end_s))
    return Candidate(seed, users, processes, ops, hot_share, tuple(windows))


def _draw_window(rng: random.Random, vocabulary: Vocabulary,
                 placed: list[Window]) -> Window | None:  # fmt: skip
    kinds = [k for k in sorted(KINDS) if KINDS[k].targets(vocabulary)]
    kind = rng.choices(kinds, [KINDS[k].weight for k in kinds])[0]
    target = rng.choice(list(KINDS[kind].targets(vocabulary)))
    window = KINDS[kind].draw(rng, Window(kind, target, 0.0, 0.0))
    for _ in range(PLACE_TRIES_MAX):
        start_s = grid(rng.uniform(START_S_MIN, START_S_MAX))
        end_s = min(grid(start_s + rng.uniform(LENGTH_S_MIN, LENGTH_S_MAX)), METHOD_S_MAX)
        moved = replace(window, start_s=start_s, end_s=end_s)
        if valid_windows([*placed, moved]):
            return moved
    return None  # no room for it on this timeline


def grid(seconds: float) -> float:
    return round(round(seconds / STEP_S) * STEP_S, 1)


def valid_windows(windows: Iterable[Window]) -> bool:
    """Each window inside the method and long enough; no two of one lock within LOCK_GAP_S;
    no step within RESTART_GAP_S after a restart."""
    windows = list(windows)
    return _placed(windows) and not any(_after_restart(w, windows) for w in windows)


def _after_restart(w: Window, windows: list[Window]) -> bool:
    if not KINDS[w.kind].restarts:
        return False
    times = [t for o in windows if o is not w for t in (o.start_s, o.end_s)]
    return any(w.end_s - 1e-9 <= t <= w.end_s + RESTART_GAP_S for t in times)


def _placed(windows: list[Window]) -> bool:
    held: dict[str, list[Window]] = {}
    for w in windows:
        if not (w.start_s > 0 and w.start_s + LENGTH_S_MIN <= w.end_s + 1e-9
                and w.end_s <= METHOD_S_MAX):  # fmt: skip
            return False
        key = lock(w)
        if key is None:
            continue
        for other in held.setdefault(key, []):
            if w.start_s < other.end_s + LOCK_GAP_S and other.start_s < w.end_s + LOCK_GAP_S:
                return False
        held[key].append(w)
    return True


def valid(candidate: Candidate) -> bool:
    c = candidate
    return (USERS[0] <= c.users and PROCESSES[0] <= c.processes and OPS[0] <= c.ops
            and 0 <= c.hot_share <= 1 and valid_windows(c.windows))  # fmt: skip


def raw_steps(candidate: Candidate) -> list[dict[str, Any]]:
    """The method as a file's [[method]] tables, in time order (a heal before a start at the
    same time: the window that ends lets the next one begin)."""
    timed = []
    for i, w in enumerate(candidate.windows):
        name = f"{w.type}-{w.stream}-{i}"
        timed.append((w.start_s, 1, i, {"at_s": w.start_s, **KINDS[w.kind].start(w, name)}))
        timed.append((w.end_s, 0, i, {"at_s": w.end_s, **KINDS[w.kind].heal(w, name)}))
    return [raw for *_key, raw in sorted(timed, key=lambda t: t[:3])]


def steps(candidate: Candidate) -> tuple[Step, ...]:
    """The method as chaos.runner.scenario reads it from the file ``to_toml`` writes."""
    return tuple(_step(raw) for raw in raw_steps(candidate))


def _step(raw: Mapping[str, Any]) -> Step:
    target = str(raw.get("proxy") or raw.get("process") or "")
    body: Mapping[str, Any] = {"lose_data": True} if raw.get("lose_data") else {}
    if raw["action"] == "toxic":
        body = raw["toxic"]
    elif raw["action"] == "remove_toxic":
        body = {"name": raw["name"]}
    elif raw["action"] == "bank_faults":
        body = raw["faults"]
    return Step(float(raw["at_s"]), raw["action"], target, body)


def workload(candidate: Candidate) -> WorkloadParams:
    return WorkloadParams(users=candidate.users, processes=candidate.processes,
                          ops_per_process=candidate.ops, seed=candidate.seed,
                          hot_share=candidate.hot_share)  # fmt: skip


def title(candidate: Candidate) -> str:
    return f"Explorer: seed {candidate.seed}, {len(candidate.windows)} fault window(s)"


def to_scenario(candidate: Candidate, name: str, description: str = "") -> Scenario:
    """What chaos.runner.scenario.load reads back from ``to_toml``'s file named ``name``.toml."""
    return Scenario(name, title(candidate), description, workload(candidate), steps(candidate),
                    frozenset({503}), DEFAULT)  # fmt: skip


def to_toml(candidate: Candidate, description: str = "") -> str:
    lines = [f"title = {_value(title(candidate))}", f"description = {_value(description)}",
             "tolerated = [503]", "", "[workload]", f"users = {candidate.users}",
             f"processes = {candidate.processes}", f"ops = {candidate.ops}"]  # fmt: skip
    if candidate.hot_share > 0:  # the file takes only a share above 0
        lines.append(f"hot_share = {_value(candidate.hot_share)}")
    for raw in raw_steps(candidate):
        lines += ["", "[[method]]", *(f"{k} = {_value(v)}" for k, v in raw.items())]
    return "\n".join(lines) + "\n"


def _value(value: object) -> str:
    """A TOML value: JSON's strings and numbers are TOML's; tables inline."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{k} = {_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, int | float | str):
        return json.dumps(value)
    raise TypeError(f"no TOML for {value!r}")
