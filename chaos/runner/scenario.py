"""Chaos scenarios: the bank workload against a system whose PostgreSQL, Redis and bank sit
behind the fault proxy, with faults on a timeline, then healing, convergence and the checker.

A scenario is a TOML file (chaos/scenarios/*.toml), shaped as a Chaos Toolkit experiment where the
two overlap (title, description, steady-state-hypothesis, method, rollbacks, configuration);
docs/chaos.md "Writing a scenario" explains every key with one annotated file:

    title = "..."
    description = "..."
    tolerated = [503]          # answers that count as "unknown outcome" under faults (only 503)

    [workload]                 # chaos.runner.workload.WorkloadParams fields, optional
    users = 12
    processes = 8
    ops = 80
    hot_share = 0.5            # the share of transfers sent to one account (default 0)

    [configuration]            # optional: the system's settings for this run (CONFIGURATION)
    redrive_attempts_max = 3

    [steady-state-hypothesis]  # optional (chaos.runner.hypothesis.DEFAULT when absent)
    title = "..."
    [[steady-state-hypothesis.probes]]
    name = "the ledger's audit is clean"
    provider = "ledger_audit"  # chaos.runner.hypothesis.PROVIDERS
    tolerance = 0              # an exact value (a status code for HTTP probes) or [min, max]

    [[method]]                 # in time order
    at_s = 1.0
    action = "toxic"           # toxic | remove_toxic | disable | enable | bank_faults | heal
                               # | kill | restart | pause | resume | probe
    proxy = "postgres_worker"  # a link, <service>_<role>: postgres_api, postgres_worker,
                               # postgres_janitor, redis_api, redis_worker, redis_janitor,
                               # bank_worker, bank_janitor; or postgres | redis | bank, each
                               # every link of that service: toxic, remove_toxic, disable, enable
    process = "worker-0"       # kill (SIGKILL, with its own children), restart, pause (SIGSTOP),
                               # resume (SIGCONT): worker-N, api, janitor, bank; kill and
                               # restart also: postgres, valkey (the embedded servers)
    lose_data = true           # restart of valkey only: it comes back empty
    toxic = { type = "latency", stream = "downstream", attributes = { latency = 30 } }

    [[rollbacks]]              # optional: steps run in order once the method has ended
    action = "enable"          # (no at_s); heal always runs after them
    proxy = "bank"

``bank_faults`` takes ``faults = { error_rate = 0.1, drop_rate = 0.2, lose_rate = 0.1,
latency_ms = 20 }`` (lose: the request read, then lost before the bank acts);
``remove_toxic`` takes ``name``; ``probe`` takes ``probe = { name, provider, tolerance,
arguments }`` and fails the run when the value is out of tolerance (a fault that did not do what
it was meant to do tested nothing); ``heal`` starts killed processes again, resets the proxy and
clears the bank's faults (the default rollback, and it always runs last when the workload ends,
so nothing is left broken). The seed (``--seed``) drives the workload and the bank's fault dice.

Strict: the workload keeps its load on until the timeline has run (within ``seconds_max``), and
a step that could not run when planned fails the run: skipped (the workload's deadline came
first), started more than ``STEP_LATE_S_MAX`` after its ``at_s``, or refused (its action failed).
The report lists each step's planned and actual time.
"""

from __future__ import annotations

import itertools
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx
import trio

from chaos.runner.hypothesis import (
    DEFAULT,
    Hypothesis,
    HypothesisError,
    Probe,
    Prober,
    parse_hypothesis,
    parse_probe,
)
from chaos.runner.workload import WorkloadParams
from infra.system import LINK_ALIASES, LINKS, links_of

SCENARIOS_DIR = Path(__file__).resolve().parents[1] / "scenarios"  # chaos/scenarios
ACTIONS = ("toxic", "remove_toxic", "disable", "enable", "bank_faults", "heal", "kill", "restart",
           "pause", "resume", "probe")  # fmt: skip
PROCESS_ACTIONS = ("kill", "restart", "pause", "resume")
PROCESS = re.compile(r"worker-[0-9]+|api|janitor|bank|postgres|valkey")
SERVERS = frozenset({"postgres", "valkey"})  # embedded servers: kill and restart only
# Every proxy name a step may name: each link (one role's way to one service: infra.system),
# then the services' names of earlier builds, each acting on every link of its service.
PROXIES = (*LINKS, *LINK_ALIASES)
TOLERABLE = frozenset({503})
RUN_S_MAX = 300.0
# How much later than planned a step may start: a restart waits for its process to serve
# (about a second), which delays the steps after it.
STEP_LATE_S_MAX = 3.0
WORKLOAD_KEYS = {"users": "users", "processes": "processes", "ops": "ops_per_process",
                 "seconds_max": "seconds_max", "converge_s_max": "converge_s_max",
                 "hot_share": "hot_share"}  # fmt: skip
# [configuration]: the system settings a scenario may choose for its run -> (variable, integer,
# maximum); the rest of chaos.runner.CHAOS_OVERRIDES stays.
CONFIGURATION = {
    "janitor_interval_s": ("KIZO_JANITOR_INTERVAL_S", False, 60),
    "redrive_after_s": ("KIZO_REDRIVE_AFTER_S", False, 600),
    "redrive_attempts_max": ("KIZO_REDRIVE_ATTEMPTS_MAX", True, 1000),
    "redrive_backoff_base_s": ("KIZO_REDRIVE_BACKOFF_BASE_S", False, 600),
    "redrive_backoff_max_s": ("KIZO_REDRIVE_BACKOFF_MAX_S", False, 3600),
    "rearm_max": ("KIZO_REARM_MAX", True, 1000),
    # Short-lived access tokens: the workload's clients meet 401s mid-run and refresh.
    "access_ttl_s": ("KIZO_ACCESS_TTL_S", True, 86_400),
}
TOP_KEYS = frozenset({"title", "description", "tolerated", "workload", "configuration",
                      "steady-state-hypothesis", "method", "rollbacks"})  # fmt: skip


class ScenarioError(Exception):
    """A scenario file that cannot be run: one line saying why."""


@dataclass(frozen=True)
class Step:
    at_s: float
    action: str
    target: str = ""  # a proxy's name, or a process's (kill, restart)
    body: Mapping[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        if self.action == "probe":
            probe: Probe = self.body["probe"]
            return f"probe {probe.name} ({probe.provider} {probe.describe_tolerance()})"
        target = f" {self.target}" if self.target else ""
        detail = f" {dict(self.body)}" if self.body else ""
        return f"{self.action}{target}{detail}"


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    description: str
    workload: WorkloadParams
    method: tuple[Step, ...]
    tolerated: frozenset[int]
    hypothesis: Hypothesis = DEFAULT
    rollbacks: tuple[Step, ...] = ()
    configuration: Mapping[str, str] = field(default_factory=dict)  # environment overrides


def find(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix != ".toml":
        path = SCENARIOS_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in SCENARIOS_DIR.glob("*.toml")))
        raise ScenarioError(f"no scenario {name_or_path!r} (known: {known})")
    return path


def names() -> list[str]:
    return sorted(p.stem for p in SCENARIOS_DIR.glob("*.toml"))


def load(name_or_path: str, seed: int) -> Scenario:
    path = find(name_or_path)
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ScenarioError(f"{path.name}: {exc}") from None
    where = path.name
    unknown = sorted(set(data) - TOP_KEYS)
    if unknown:
        raise ScenarioError(
            f"{where}: unknown key {unknown[0]!r} (keys: {', '.join(sorted(TOP_KEYS))})"
        )
    title = _text(data, "title", where)
    tolerated = data.get("tolerated", [])
    if not isinstance(tolerated, list) or not set(tolerated) <= TOLERABLE:
        raise ScenarioError(f"{where}: tolerated may list only {sorted(TOLERABLE)}")
    method = _steps(data.get("method", []), f"{where} method", "method")
    if any(a.at_s > b.at_s for a, b in itertools.pairwise(method)):
        raise ScenarioError(f"{where}: method steps must be in time order")
    rollbacks = _steps(data.get("rollbacks", []), f"{where} rollbacks", "rollbacks")
    if any("at_s" in raw for raw in data.get("rollbacks", [])):
        raise ScenarioError(f"{where}: rollbacks run in order once the method ends: no at_s")
    try:
        hypothesis = parse_hypothesis(data.get("steady-state-hypothesis"), where)
    except HypothesisError as exc:
        raise ScenarioError(str(exc)) from None
    return Scenario(path.stem, title, str(data.get("description", "")),
                    _workload(data.get("workload", {}), seed, where), method,
                    frozenset(tolerated), hypothesis, rollbacks,
                    _configuration(data.get("configuration", {}), where))  # fmt: skip


def _steps(raw: object, where: str, key: str) -> tuple[Step, ...]:
    if not isinstance(raw, list) or not all(isinstance(s, dict) for s in raw):
        raise ScenarioError(f"{where}: {key} must be an array of tables ([[{key}]])")
    return tuple(_step(s, f"{where}[{i}]") for i, s in enumerate(raw))


def _configuration(raw: object, where: str) -> dict[str, str]:
    if not isinstance(raw, dict) or not set(raw) <= set(CONFIGURATION):
        raise ScenarioError(f"{where}: [configuration] takes only {', '.join(CONFIGURATION)}")
    env = {}
    for key, value in raw.items():
        variable, integer, high = CONFIGURATION[key]
        kind = int if integer else int | float
        if isinstance(value, bool) or not isinstance(value, kind) or not 0 < value <= high:
            what = "a whole number" if integer else "a number"
            raise ScenarioError(
                f"{where}: configuration.{key} must be {what} above 0, at most {high}"
            )
        env[variable] = str(value)
    return env


def _text(data: Mapping[str, Any], key: str, where: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise ScenarioError(f"{where}: {key} must be a non-empty string")
    return value


def _workload(raw: object, seed: int, where: str) -> WorkloadParams:
    if not isinstance(raw, dict) or not set(raw) <= set(WORKLOAD_KEYS):
        raise ScenarioError(f"{where}: [workload] takes only {sorted(WORKLOAD_KEYS)}")
    values: dict[str, Any] = {"seed": seed}
    for key, value in raw.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ScenarioError(f"{where}: workload.{key} must be a positive number")
        values[WORKLOAD_KEYS[key]] = value
    if values.get("hot_share", 0) > 1:
        raise ScenarioError(f"{where}: workload.hot_share must be a share from 0 to 1")
    if values.get("users", 2) < 2 or values.get("users", 2) > 500:
        raise ScenarioError(f"{where}: workload.users must be between 2 and 500")
    params = WorkloadParams(**values)
    if params.seconds_max + params.converge_s_max > RUN_S_MAX:
        raise ScenarioError(f"{where}: the run may last at most {RUN_S_MAX:.0f} s")
    return params


def _step(raw: Mapping[str, Any], where: str) -> Step:
    action, at_s = raw.get("action"), raw.get("at_s", 0)
    if action not in ACTIONS:
        raise ScenarioError(f"{where}: action must be one of {', '.join(ACTIONS)}")
    if isinstance(at_s, bool) or not isinstance(at_s, int | float) or not 0 <= at_s <= RUN_S_MAX:
        raise ScenarioError(f"{where}: at_s must be a number of seconds from 0 to {RUN_S_MAX:.0f}")
    target = raw.get("proxy", "")
    if action in ("toxic", "remove_toxic", "disable", "enable") and target not in PROXIES:
        raise ScenarioError(f"{where}: proxy must be one of {', '.join(PROXIES)}")
    if action in PROCESS_ACTIONS:
        target = raw.get("process", "")
        if not isinstance(target, str) or not PROCESS.fullmatch(target):
            raise ScenarioError(
                f"{where}: process must be worker-N, api, janitor, bank, postgres or valkey"
            )
        if action in ("pause", "resume") and target in SERVERS:
            raise ScenarioError(f"{where}: {target} can only be killed and restarted")
    lose_data = raw.get("lose_data", False)
    if lose_data and (action != "restart" or target != "valkey" or lose_data is not True):
        raise ScenarioError(f"{where}: lose_data = true goes only with restart of valkey")
    body: Mapping[str, Any] = {"lose_data": True} if lose_data else {}
    if action == "toxic":
        body = raw.get("toxic", {})
    elif action == "remove_toxic":
        body = {"name": raw.get("name")}
    elif action == "bank_faults":
        body = raw.get("faults", {})
    elif action == "probe":
        if not isinstance(raw.get("probe"), dict):
            raise ScenarioError(
                f"{where}: probe needs its table: probe = {{ name, provider, tolerance }}"
            )
        try:
            body = {"probe": parse_probe(raw["probe"], f"{where} probe")}
        except HypothesisError as exc:
            raise ScenarioError(str(exc)) from None
    unnamed = action == "remove_toxic" and not isinstance(body.get("name"), str)
    if not isinstance(body, dict) or unnamed:
        raise ScenarioError(f"{where}: {action} needs its table (toxic, faults) or name")
    return Step(float(at_s), str(action), str(target), body)


class Processes(Protocol):
    def kill(self, name: str) -> None: ...
    def pause(self, name: str) -> None: ...
    def resume(self, name: str) -> None: ...
    def respawn(self, name: str, lose_data: bool = False) -> None: ...
    def wait_started(self, name: str) -> None: ...


@dataclass
class Timeline:
    """Applies a scenario's steps against the proxy, the bank and the processes; records what
    happened."""

    proxy_url: str
    bank_url: str
    seed: int
    processes: Processes | None = None
    prober: Prober | None = None
    applied: list[dict[str, Any]] = field(default_factory=list)
    rolled_back: list[dict[str, Any]] = field(default_factory=list)
    down: set[str] = field(default_factory=set)  # killed and not restarted yet
    paused: set[str] = field(default_factory=set)  # stopped (SIGSTOP) and not resumed yet
    observe: Callable[[Step, int | str], None] | None = None  # told each step (runner.metrics)

    async def run(self, steps: Sequence[Step], started: float) -> None:
        async with httpx.AsyncClient(timeout=10) as http:
            for step in steps:
                await trio.sleep_until(started + step.at_s)
                actual_s = trio.current_time() - started
                try:
                    status = await self._apply(http, step)
                except (ScenarioError, httpx.HTTPError) as exc:
                    status = f"error: {exc}"
                self.applied.append({
                    "at_s": step.at_s,  # planned
                    "actual_s": round(actual_s, 2),
                    "took_s": round(trio.current_time() - started - actual_s, 2),
                    "step": step.describe(),
                    "status": status,
                })  # fmt: skip
                if self.observe is not None:
                    self.observe(step, status)

    def failures(self, steps: Sequence[Step]) -> list[str]:
        """Why the run cannot count: each step skipped, late or refused."""
        reasons: list[str] = []
        for done in self.applied:
            late_s = done["actual_s"] - done["at_s"]
            if late_s > STEP_LATE_S_MAX:
                reasons.append(f"late by {late_s:.2f} s (more than {STEP_LATE_S_MAX} s): "
                               f"{done['step']}")  # fmt: skip
            if isinstance(done["status"], str) and done["status"].startswith("error"):
                reasons.append(f"failed: {done['status'].removeprefix('error: ')}")
        reasons += [f"skipped (the workload ended first): {s.describe()}"
                    for s in steps[len(self.applied):]]  # fmt: skip
        refused = [d["status"] for d in self.rolled_back if str(d["status"]).startswith("error")]
        reasons += [f"rollback failed: {s.removeprefix('error: ')}" for s in refused]
        return reasons

    async def rollback(self, http: httpx.AsyncClient, steps: Sequence[Step]) -> None:
        """The scenario's rollbacks in order, whatever happened, then heal: nothing stays
        broken even when a file's rollbacks forget something."""
        for step in steps:
            try:
                status = await self._apply(http, step)
            except (ScenarioError, httpx.HTTPError) as exc:
                status = f"error: {exc}"
            self.rolled_back.append({"step": step.describe(), "status": status})
        await self.heal(http)

    async def _apply(self, http: httpx.AsyncClient, step: Step) -> int | str:
        if step.action in PROCESS_ACTIONS:
            try:
                return await self._control(step)
            except (KeyError, RuntimeError, OSError) as exc:
                raise ScenarioError(f"{step.describe()}: {exc}") from None
        if step.action == "probe":
            return await self._probe(step.body["probe"])
        if step.action in ("toxic", "remove_toxic", "disable", "enable"):
            return await self._on_links(http, step)
        if step.action == "bank_faults":
            r = await http.put(f"{self.bank_url}/admin/faults",
                               json={"seed": self.seed, **step.body})  # fmt: skip
        else:
            return await self.heal(http)
        if r.status_code >= 300:
            raise ScenarioError(f"{step.describe()}: {r.status_code} {r.text.strip()[:200]}")
        return r.status_code

    async def _on_links(self, http: httpx.AsyncClient, step: Step) -> int:
        """A proxy step on each link its name stands for (an alias: every link of a service),
        in order; the first refusal fails the step (the links before it keep the change, as
        the heal at the end undoes every proxy's)."""
        status = 0
        for link in links_of(step.target):
            url = f"{self.proxy_url}/proxies/{link}"
            if step.action == "toxic":
                r = await http.post(f"{url}/toxics", json=dict(step.body))
            elif step.action == "remove_toxic":
                r = await http.delete(f"{url}/toxics/{step.body['name']}")
            else:
                r = await http.post(url, json={"enabled": step.action == "enable"})
            if r.status_code >= 300:
                raise ScenarioError(f"{step.describe()}: {link}: {r.status_code} "
                                    f"{r.text.strip()[:200]}")  # fmt: skip
            status = max(status, r.status_code)
        return status

    async def _probe(self, probe: Probe) -> str:
        if self.prober is None:
            raise ScenarioError(f"probe {probe.name}: no system to probe in this run")
        [result] = await self.prober.run([probe])
        if not result["ok"]:
            raise ScenarioError(f"probe {probe.name}: {probe.provider} = "
                                f"{result.get('error', result['value'])}, expected "
                                f"{probe.describe_tolerance()}")  # fmt: skip
        return f"value {result['value']}"

    async def _control(self, step: Step) -> str:
        if self.processes is None:
            raise ScenarioError(f"{step.describe()}: no process control in this run")
        name = step.target
        if step.action == "kill":
            await trio.to_thread.run_sync(self.processes.kill, name)
            self.down.add(name)
            return "killed"
        if step.action == "pause":
            self.processes.pause(name)
            self.paused.add(name)
            return "paused"
        if step.action == "resume":
            self.processes.resume(name)
            self.paused.discard(name)
            return "running"
        await self._restart(name, bool(step.body.get("lose_data")))
        self.down.discard(name)
        return "running"

    async def _restart(self, name: str, lose_data: bool = False) -> None:
        assert self.processes is not None
        # Spawned here, in trio's thread (the main one): a process dies with the thread that
        # spawned it, and trio's worker threads end when idle. Its start is waited for in one.
        # (An embedded server starts whole here, blocking the loop for the second it takes.)
        self.processes.respawn(name, lose_data)
        await trio.to_thread.run_sync(self.processes.wait_started, name)

    async def heal(self, http: httpx.AsyncClient) -> int:
        """Every process paused is resumed and every one killed started again (servers first),
        every proxy reset, the bank's faults gone."""
        assert self.processes is not None or not (self.paused or self.down)
        for name in sorted(self.paused):
            assert self.processes is not None
            self.processes.resume(name)
        self.paused.clear()
        for name in sorted(self.down, key=lambda n: (n not in SERVERS, n)):
            await self._restart(name)
        self.down.clear()
        reset = await http.post(f"{self.proxy_url}/reset")
        cleared = await http.delete(f"{self.bank_url}/admin/faults")
        return max(reset.status_code, cleared.status_code)
