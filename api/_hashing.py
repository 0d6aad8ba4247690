"""Argon2id in its own low-priority processes, on the CPU that payments leave idle.

Each API process keeps ``AuthConfig.hash_processes`` hashing processes (``python -m
api._hashing``), spoken to over their stdin and stdout, one line per request and per answer:

    request  "h\\t<secret>\\n"             answer "ok\\t<cpu µs>\\t<argon2 hash>\\n"
    request  "v\\t<stored>\\t<secret>\\n"   answer "ok\\t<cpu µs>\\t1\\n" or "ok\\t<cpu µs>\\t0\\n"

``secret`` is the peppered password, base64 (no tab, no newline); hashes have neither either.
Why a process and not a thread: a thread starved of CPU can sit on the GIL the event loop needs,
and the API's event loop does the pipes' I/O itself. A hashing process:
- runs under Linux's SCHED_IDLE policy: it gets a core only when nothing else wants one;
- is given work at the pace of a ``HashBudget``: a share of one core that grows while payments
  are fast and halves as soon as a tenth of them are slow (additive increase, multiplicative
  decrease, as TCP shares a link). After a hash that cost t of CPU the next starts no sooner than
  t * (1 - share) / share later. Priority alone is not enough: a core hashing flat out slows
  the other one (on a VM possibly one physical core), which no policy inside the guest prevents;
- is paused (SIGSTOP) while its API process has payments in flight, for at most
  ``hold_max_s * (1 - share)`` per hash: at a full share (payments fast) not at all;
- ignores Ctrl-C (its parent ends it by closing stdin) and dies with its parent (PDEATHSIG).

An urgent request (a sign-in that has waited ``AuthConfig.signin_urgent_s``) is exempt from all
three: no rest before it, no pause, and normal CPU priority while it runs. A budget that only
ever yields would starve sign-ins outright on a busy machine; aging bounds their wait instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import sys
import time
from collections.abc import Callable

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

READY = b"ready\n"
STOP_WAIT_S = 2.0
_PR_SET_PDEATHSIG = 1
_US_PER_S = 1_000_000


class HashingUnavailable(Exception):
    """The hashing process died or answered nonsense; a new one starts for the next request."""


class HashBudget:
    """The share of one core that hashing may use, adapted to how payments fare.

    Payments report their latency (``observe``); every ``window_s`` the window decides: when
    more than ``slow_share`` of its payments took longer than ``target_s`` the share halves
    (down to ``share_min``), otherwise, or when no payment ran, it grows by ``share_step`` (up
    to 1). Not the slowest payment alone: one slow payment among many is noise (a GC pause, a
    batch commit), a slow tenth is contention. A pure object: time is passed in, so tests
    drive it without sleeping.
    """

    def __init__(self, target_s: float, share_min: float, share_step: float = 0.1,
                 window_s: float = 0.5, share_start: float = 1.0,
                 slow_share: float = 0.1) -> None:  # fmt: skip
        assert 0 < share_min <= share_start <= 1 and 0 < share_step <= 1 and window_s > 0
        self.target_s = target_s
        self.share_min = share_min
        self.share_step = share_step
        self.window_s = window_s
        self.slow_share = slow_share
        self.share = share_start
        self._window_ends = 0.0
        self._payments = 0
        self._slow = 0

    def observe(self, latency_s: float, now: float) -> None:
        self.advance(now)
        self._payments += 1
        self._slow += latency_s > self.target_s

    def advance(self, now: float) -> None:
        """Close the windows that have ended by ``now``; each adjusts the share once."""
        if now < self._window_ends:
            return
        if self._window_ends == 0.0:  # the first observation opens the first window
            self._window_ends = now + self.window_s
            return
        if self._slow > self.slow_share * self._payments:
            self.share = max(self.share_min, self.share / 2)
        else:  # a fast window, or one without payments: the CPU was there to take
            elapsed = 1 + int((now - self._window_ends) // self.window_s)
            self.share = min(1.0, self.share + self.share_step * elapsed)
        self._payments = self._slow = 0
        self._window_ends = now + self.window_s

    def rest_s(self, cpu_s: float) -> float:
        """How long to rest after a hash that cost ``cpu_s`` of CPU, at the current share."""
        return cpu_s * (1 - self.share) / self.share

    def hold_s(self, hold_max_s: float) -> float:
        """How long one hash may be paused, in all, for payments in flight."""
        return hold_max_s * (1 - self.share)


class HashWorker:
    """The API's end of one hashing process: one request at a time (the caller ensures it).

    ``held()`` says whether requests that outrank hashing are in flight in this API process:
    while they are, the running hash is paused (SIGSTOP), for at most ``budget.hold_s`` in all
    per hash, so that sign-ins still go through under a steady stream of payments.
    """

    def __init__(self, memory_kib: int, time_cost: int, parallelism: int, budget: HashBudget,
                 held: Callable[[], bool], hold_max_s: float,
                 on_pause: Callable[[], None] | None = None) -> None:  # fmt: skip
        self._on_pause = on_pause  # told of each pause (the API's metrics)
        self._argv = [str(v) for v in (memory_kib, time_cost, parallelism)]
        self._proc: asyncio.subprocess.Process | None = None
        self._budget = budget
        self._held = held
        self._hold_max_s = hold_max_s
        self._job_held_s = 0.0  # how long the running hash has been paused so far
        self._paused_at: float | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._rest_until = 0.0  # the budget's pacing: no hash starts before this
        self.busy = False
        self._urgent = False  # the running request is urgent: never paused

    async def _start(self) -> asyncio.subprocess.Process:
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "api._hashing", *self._argv,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip
        except OSError as exc:  # out of processes or file descriptors: a 503, not a 500
            raise HashingUnavailable(f"the hashing process could not start: {exc}") from exc
        assert proc.stdout is not None
        if await proc.stdout.readline() != READY:
            await _end(proc)
            raise HashingUnavailable("the hashing process did not start")
        self._proc = proc
        return proc

    async def call(self, request: str, urgent: bool = False) -> str:
        """One request's answer. ``urgent``: no rest before it, no pause, normal priority."""
        if not urgent:
            await asyncio.sleep(max(0.0, self._rest_until - time.monotonic()))
        proc = self._proc
        if proc is None or proc.returncode is not None:
            proc = await self._start()
        assert proc.stdin is not None and proc.stdout is not None
        self.busy, self._job_held_s, self._urgent = True, 0.0, urgent
        if urgent:
            _set_priority(proc.pid, idle=False)
        try:
            proc.stdin.write(request.encode() + b"\n")
            await proc.stdin.drain()
            if self._held():
                self.pause()
            answer = await proc.stdout.readline()
        except (BrokenPipeError, ConnectionResetError):
            answer = b""
        finally:
            self.resume()
            self.busy, self._urgent = False, False
            if urgent:
                _set_priority(proc.pid, idle=True)
        status, cpu_us, value = _parse(answer)
        if status != "ok" or not answer.endswith(b"\n"):
            self._proc = None
            await _end(proc)
            raise HashingUnavailable("the hashing process failed")
        now = time.monotonic()
        self._budget.advance(now)
        self._rest_until = now + self._budget.rest_s(cpu_us / _US_PER_S)
        return value

    def pause(self) -> None:
        """Pause the running hash, unless it has been held long enough already."""
        proc = self._proc
        if not self.busy or self._urgent or self._paused_at is not None or proc is None:
            return
        left_s = self._budget.hold_s(self._hold_max_s) - self._job_held_s
        if left_s <= 0 or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGSTOP)
            self._paused_at = time.monotonic()
            if self._on_pause is not None:
                self._on_pause()
            self._deadline = asyncio.get_running_loop().call_later(left_s, self.resume)

    def resume(self) -> None:
        if self._paused_at is None:
            return
        self._job_held_s += time.monotonic() - self._paused_at
        self._paused_at = None
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if self._proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._proc.pid, signal.SIGCONT)

    async def start(self) -> None:
        if self._proc is None:
            await self._start()

    async def stop(self) -> None:
        self.resume()
        proc, self._proc = self._proc, None
        if proc is not None:
            await _end(proc)


def _set_priority(pid: int, *, idle: bool) -> None:
    """SCHED_IDLE (hashing's default) or back to SCHED_OTHER, for an urgent request. Linux
    lets an unprivileged process make that switch within its RLIMIT_NICE; where it may not,
    the urgent request still skips rests and pauses."""
    policy = os.SCHED_IDLE if idle else os.SCHED_OTHER
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setscheduler(pid, policy, os.sched_param(0))


def _parse(answer: bytes) -> tuple[str, int, str]:
    """(status, CPU µs, value) of an answer line; ("error", 0, "") for anything else."""
    parts = answer.decode(errors="replace").rstrip("\n").split("\t")
    if len(parts) == 3 and parts[1].isdigit():
        return parts[0], int(parts[1]), parts[2]
    return "error", 0, ""


async def _end(proc: asyncio.subprocess.Process) -> None:
    """Close its stdin (it exits on EOF); kill it if it lingers."""
    if proc.stdin is not None:
        proc.stdin.close()
    try:
        await asyncio.wait_for(proc.wait(), STOP_WAIT_S)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


# The hashing process's side.


def _prepare() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    with contextlib.suppress(OSError, AttributeError):
        # SIGKILL: a paused (stopped) process would not act on SIGTERM.
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _answer(hasher: PasswordHasher, request: str) -> str:
    match request.split("\t"):
        case ["h", secret]:
            return hasher.hash(secret.encode())
        case ["v", stored, secret]:
            try:
                return "1" if hasher.verify(stored, secret.encode()) else "0"
            except (VerificationError, InvalidHashError):
                return "0"
    raise ValueError("unknown request")


def serve(memory_kib: int, time_cost: int, parallelism: int) -> None:
    _prepare()
    hasher = PasswordHasher(time_cost=time_cost, memory_cost=memory_kib, parallelism=parallelism)
    out = sys.stdout.buffer
    out.write(READY)
    out.flush()
    for raw in sys.stdin.buffer:
        started = time.process_time()  # CPU time: a pause is not work
        try:
            value = _answer(hasher, raw.decode().rstrip("\n"))
            cpu_us = int((time.process_time() - started) * _US_PER_S)
            answer = f"ok\t{cpu_us}\t{value}"
        except ValueError:
            answer = "error"
        out.write(answer.encode() + b"\n")
        out.flush()


if __name__ == "__main__":
    memory, passes, lanes = (int(v) for v in sys.argv[1:4])
    serve(memory, passes, lanes)
