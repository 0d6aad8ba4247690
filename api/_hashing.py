"""Argon2id in its own low-priority processes, so that payments never pay for sign-ins.

Each API process keeps ``AuthConfig.hash_processes`` hashing processes (``python -m
api._hashing``), spoken to over their stdin and stdout, one line per request and per answer:

    request  "h\\t<secret>\\n"             answer "ok\\t<argon2 hash>\\n"
    request  "v\\t<stored>\\t<secret>\\n"   answer "ok\\t1\\n" or "ok\\t0\\n"

``secret`` is the peppered password, base64 (no tab, no newline); hashes have neither either.
Why a process and not a thread: a thread starved of CPU can sit on the GIL the event loop needs,
and the API's event loop does the pipes' I/O itself. A hashing process:
- runs under Linux's SCHED_IDLE policy: it gets a core only when nothing else wants one;
- is paced to a duty cycle (``AuthConfig.hash_duty_pct``): after a hash that took t, the next
  starts no sooner than t * (100 - duty) / duty later. A core hashing flat out slows the other
  one (on a VM possibly one physical core), which no scheduling policy inside the guest prevents;
- is paused while its API process has payments in flight (see ``HashWorker``);
- ignores Ctrl-C (its parent ends it by closing stdin) and dies with its parent (PDEATHSIG).
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


class HashingUnavailable(Exception):
    """The hashing process died or answered nonsense; a new one starts for the next request."""


class HashWorker:
    """The API's end of one hashing process: one request at a time (the caller ensures it).

    ``held()`` says whether requests that outrank hashing are in flight in this API process:
    while they are, the running hash is paused (SIGSTOP), for at most ``hold_max_s`` in all per
    hash, so that sign-ins still go through under a steady stream of payments.
    """

    def __init__(self, memory_kib: int, time_cost: int, parallelism: int, duty_pct: int,
                 held: Callable[[], bool], hold_max_s: float,
                 on_pause: Callable[[], None] | None = None) -> None:  # fmt: skip
        self._on_pause = on_pause  # told of each pause (the API's metrics)
        self._argv = [str(v) for v in (memory_kib, time_cost, parallelism, duty_pct)]
        self._proc: asyncio.subprocess.Process | None = None
        self._held = held
        self._hold_max_s = hold_max_s
        self._job_held_s = 0.0  # how long the running hash has been paused so far
        self._paused_at: float | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self.busy = False

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

    async def call(self, request: str) -> str:
        proc = self._proc
        if proc is None or proc.returncode is not None:
            proc = await self._start()
        assert proc.stdin is not None and proc.stdout is not None
        self.busy, self._job_held_s = True, 0.0
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
            self.busy = False
        status, _, value = answer.decode(errors="replace").rstrip("\n").partition("\t")
        if status != "ok" or not answer.endswith(b"\n"):
            self._proc = None
            await _end(proc)
            raise HashingUnavailable("the hashing process failed")
        return value

    def pause(self) -> None:
        """Pause the running hash, unless it has been held long enough already."""
        proc = self._proc
        if not self.busy or self._paused_at is not None or proc is None:
            return
        left_s = self._hold_max_s - self._job_held_s
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


def serve(memory_kib: int, time_cost: int, parallelism: int, duty_pct: int) -> None:
    _prepare()
    hasher = PasswordHasher(time_cost=time_cost, memory_cost=memory_kib, parallelism=parallelism)
    rest_per_busy = (100 - duty_pct) / duty_pct
    next_start = 0.0
    out = sys.stdout.buffer
    out.write(READY)
    out.flush()
    for raw in sys.stdin.buffer:
        time.sleep(max(0.0, next_start - time.monotonic()))
        started = time.process_time()  # CPU time: a pause is not work
        try:
            answer = "ok\t" + _answer(hasher, raw.decode().rstrip("\n"))
        except ValueError:
            answer = "error"
        next_start = time.monotonic() + (time.process_time() - started) * rest_per_busy
        out.write(answer.encode() + b"\n")
        out.flush()


if __name__ == "__main__":
    memory, passes, lanes, duty = (int(v) for v in sys.argv[1:5])
    if not 1 <= duty <= 100:
        sys.exit("duty must be 1..100")
    serve(memory, passes, lanes, duty)
