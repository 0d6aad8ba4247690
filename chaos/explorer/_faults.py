"""The fault vocabulary as data: each kind of fault window, how it is drawn, the two steps that
start and heal it, and how it gets simpler. One entry in ``KINDS`` (or one line in ``TOXICS``
or ``BANK_FAULTS``) adds a fault to what the explorer draws and shrinks."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

# The toxics of chaos.proxy (Toxiproxy's): each attribute -> (lowest, highest, simplest). Sane
# ranges: a fault that slows or cuts, never one that holds a connection for minutes.
TOXICS: Mapping[str, Mapping[str, tuple[int, int, int]]] = {
    "latency": {"latency": (5, 400, 10), "jitter": (0, 100, 0)},  # ms
    "bandwidth": {"rate": (1, 200, 1)},  # KB/s
    "slow_close": {"delay": (10, 1500, 100)},  # ms
    "timeout": {"timeout": (0, 2000, 0)},  # ms; 0: held until the toxic goes
    "reset_peer": {"timeout": (0, 1000, 0)},  # ms
    "slicer": {"average_size": (1, 64, 1), "size_variation": (0, 32, 0),
               "delay": (0, 2000, 0)},  # bytes, bytes, µs
    "limit_data": {"bytes": (64, 65_536, 64)},
}  # fmt: skip
STREAMS = ("upstream", "downstream")
# The bank's own faults (chaos.mockbank.faults.FaultsUpdate): field -> (lowest, highest when
# drawn, simplest nonzero). A float range is a rate, an int one milliseconds.
BANK_FAULTS: Mapping[str, tuple[float, float, float] | tuple[int, int, int]] = {
    "error_rate": (0.05, 0.5, 0.5),
    "drop_rate": (0.05, 0.6, 0.5),
    "lose_rate": (0.05, 0.6, 0.5),  # read, then lost before the bank acts
    "latency_ms": (5, 300, 10),
}
TOXICITY_STEP = 0.05


@dataclass(frozen=True)
class Vocabulary:
    """What there is to break: the proxies (chaos.runner.scenario.PROXIES, read when a run starts),
    the processes that can be killed or paused, the embedded servers (kill and restart)."""

    proxies: tuple[str, ...]
    processes: tuple[str, ...]  # worker-N, api, janitor, bank
    servers: tuple[str, ...] = ("postgres", "valkey")


@dataclass(frozen=True)
class Window:
    """One fault from ``start_s`` to ``end_s`` (its heal step) into the method."""

    kind: str  # a key of KINDS
    target: str  # a proxy, a process or a server
    start_s: float
    end_s: float
    stream: str = ""  # toxic: upstream or downstream
    type: str = ""  # toxic: a key of TOXICS
    toxicity: float = 1.0
    attributes: tuple[tuple[str, int | float], ...] = ()  # toxic attributes, bank fault fields

    def describe(self) -> str:
        what = " ".join(x for x in (self.kind, self.type, self.target, self.stream) if x)
        extra = ", ".join(f"{k}={v}" for k, v in self.attributes)
        if self.kind == "toxic" and self.toxicity < 1:
            extra += f", toxicity={self.toxicity}"
        return f"{what} [{self.start_s}, {self.end_s}] s" + (f" ({extra})" if extra else "")


Raw = dict[str, Any]  # a step as a scenario file's [[method]] table, without at_s


@dataclass(frozen=True)
class Kind:
    weight: float  # how often it is drawn, against the others' weights
    targets: Callable[[Vocabulary], Sequence[str]]
    start: Callable[[Window, str], Raw]  # (window, its toxic's name) -> the step
    heal: Callable[[Window, str], Raw]
    draw: Callable[[random.Random, Window], Window] = lambda _rng, w: w  # its parameters
    simpler: Callable[[Window], Iterator[Window]] = lambda _w: iter(())
    exclusive: bool = True  # no two windows of the same lock overlap (see ``lock``)
    restarts: bool = False  # its heal starts a process again and waits for it to serve


def _toxic_draw(rng: random.Random, w: Window) -> Window:
    kind = rng.choice(sorted(TOXICS))
    attributes = []
    for name, (low, high, _simplest) in TOXICS[kind].items():
        attributes.append((name, rng.randint(low, high)))
    toxicity = 1.0 if rng.random() < 0.5 else round(rng.randint(2, 19) * TOXICITY_STEP, 2)
    return replace(w, stream=rng.choice(STREAMS), type=kind, toxicity=toxicity,
                   attributes=tuple(attributes))  # fmt: skip


def _toxic_simpler(w: Window) -> Iterator[Window]:
    if w.toxicity != 1.0:
        yield replace(w, toxicity=1.0)
    simplest = {k: s for k, (_low, _high, s) in TOXICS[w.type].items()}
    for i, (name, value) in enumerate(w.attributes):
        for smaller in dict.fromkeys((simplest[name], _halfway(simplest[name], int(value)))):
            if smaller != value:
                attrs = (*w.attributes[:i], (name, smaller), *w.attributes[i + 1 :])
                yield replace(w, attributes=attrs)


def _bank_draw(rng: random.Random, w: Window) -> Window:
    chosen = [n for n in BANK_FAULTS if rng.random() < 0.6] or [rng.choice(sorted(BANK_FAULTS))]
    attributes: list[tuple[str, int | float]] = []
    for name in sorted(chosen):
        low, high, _simplest = BANK_FAULTS[name]
        if isinstance(low, int) and isinstance(high, int):
            attributes.append((name, rng.randint(low, high)))
        else:
            attributes.append((name, round(rng.uniform(low, high), 2)))
    return replace(w, attributes=tuple(attributes))


def _bank_simpler(w: Window) -> Iterator[Window]:
    for i, (name, value) in enumerate(w.attributes):
        rest = (*w.attributes[:i], *w.attributes[i + 1 :])
        if rest:
            yield replace(w, attributes=rest)  # one fault field fewer
        simplest = BANK_FAULTS[name][2]
        if value != simplest:
            yield replace(w, attributes=(*rest[:i], (name, simplest), *rest[i:]))
        rounded = round(value, 1) if isinstance(value, float) else round(value, -1)
        if rounded not in (value, 0, simplest):
            yield replace(w, attributes=(*rest[:i], (name, rounded), *rest[i:]))


def _halfway(low: int, value: int) -> int:
    return low + (value - low) // 2


def bank_faults_body(w: Window) -> dict[str, int | float]:
    return dict(w.attributes)


def _toxic_body(w: Window, name: str) -> Raw:
    return {"name": name, "type": w.type, "stream": w.stream, "toxicity": w.toxicity,
            "attributes": dict(w.attributes)}  # fmt: skip


def _proxy(action: str) -> Callable[[Window, str], Raw]:
    return lambda w, _name: {"action": action, "proxy": w.target}


def _process(action: str, lose_data: bool = False) -> Callable[[Window, str], Raw]:
    extra = {"lose_data": True} if lose_data else {}
    return lambda w, _name: {"action": action, "process": w.target, **extra}


def _zero(value: int | float) -> int | float:
    return 0 if isinstance(value, int) else 0.0


KINDS: Mapping[str, Kind] = {
    "toxic": Kind(3.0, lambda v: v.proxies,
                  lambda w, name: {"action": "toxic", "proxy": w.target,
                                   "toxic": _toxic_body(w, name)},
                  lambda w, name: {"action": "remove_toxic", "proxy": w.target, "name": name},
                  _toxic_draw, _toxic_simpler, exclusive=False),
    "disable": Kind(1.0, lambda v: v.proxies, _proxy("disable"), _proxy("enable")),
    "bank_faults": Kind(2.0, lambda _v: ("bank",),
                        lambda w, _n: {"action": "bank_faults", "faults": bank_faults_body(w)},
                        lambda w, _n: {"action": "bank_faults",
                                       "faults": {k: _zero(BANK_FAULTS[k][0])
                                                  for k in BANK_FAULTS}},
                        _bank_draw, _bank_simpler),
    "kill": Kind(1.5, lambda v: v.processes, _process("kill"), _process("restart"),
                 restarts=True),
    "pause": Kind(1.0, lambda v: v.processes, _process("pause"), _process("resume")),
    "crash": Kind(0.5, lambda v: v.servers, _process("kill"), _process("restart"),
                  restarts=True),
    "wipe": Kind(0.5, lambda v: tuple(s for s in v.servers if s == "valkey"), _process("kill"),
                 _process("restart", lose_data=True), restarts=True),
}  # fmt: skip


def lock(w: Window) -> str | None:
    """What a window holds for its duration: windows of one lock never overlap (a process is
    killed or paused, not both; the bank's faults are the bank's own). None: overlaps freely."""
    if not KINDS[w.kind].exclusive:
        return None
    if w.kind == "disable":
        return f"proxy {w.target}"
    return f"process {w.target}"  # bank_faults: the bank's, as its kill and pause
