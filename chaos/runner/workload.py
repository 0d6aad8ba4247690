"""The bank workload (Jepsen's, adapted to a wallet): many users, concurrent payments, retries
with the same key (one after another and all at once), bad inputs, reads; every request is
recorded as an ``Op``. Then the run waits (bounded) until every transaction is final, reads the
final state from the ledger and through the API, and ``chaos.checker`` judges.

Runs on trio, like the rest of the harness; the ledger is read with asyncpg through
trio-asyncio. Only 127.0.0.1 targets; every loop is bounded in count and time.
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import json
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx
import trio
import trio_asyncio

from chaos.checker import FINAL, ApiView, FinalState, LedgerTxn, Op

REQUEST_TIMEOUT_S = 10.0
PASSWORD = "workload-password-1"  # noqa: S105 (made-up users of a scratch system)
HISTORY_PAGE = 7  # small, so that every user's history spans several pages
CONVERGE_POLL_S = 0.25
BURST = 3
UNANSWERED_RETRIES = 4
BACKOFF_S = 0.25
# A 401 (the access token expired in flight) -> refresh, then the same request again: at most
# this many times per request; a refresh is tried this many times before signing in again.
UNAUTHORIZED_RESENDS_MAX = 3
REFRESH_ATTEMPTS_MAX = 3
PAYMENTS = {
    "deposit": "/api/v1/payments/deposit",
    "withdraw": "/api/v1/payments/withdraw",
    "transfer": "/api/v1/payments/transfer",
}


@dataclass(frozen=True)
class WorkloadParams:
    users: int = 12
    processes: int = 8
    ops_per_process: int = 120
    seconds_max: float = 90.0
    converge_s_max: float = 60.0
    initial_deposit: int = 20_000
    seed: int = 1
    # The share of transfers sent to one account (the first user, a "merchant"): a hot row
    # that every transfer's lock queues on. 0: destinations uniform.
    hot_share: float = 0.0


@dataclass
class Session:
    """A member's tokens, renewed when the API says the access token has expired (401)."""

    access_token: str
    refresh_token: str
    # One renewal at a time: a refresh token is single-use, and every request of the member
    # that met the same expired token asks for a renewal.
    lock: trio.Lock = field(default_factory=trio.Lock)
    refreshes: int = 0
    signins: int = 0


@dataclass(frozen=True)
class Member:
    id: str
    email: str
    account_id: str
    session: Session = field(compare=False)

    @property
    def token(self) -> str:
        return self.session.access_token


def token_expired_s(token: str, now_s: float) -> float | None:
    """How long ago (wall clock) the JWT's ``exp`` passed (negative: still valid); None when it
    has none. Read without verifying: only the time matters here."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return now_s - float(claims["exp"])
    except (IndexError, binascii.Error, ValueError, KeyError, TypeError):
        return None


async def renew(client: httpx.AsyncClient, member: Member, stale: str) -> None:
    """What a client does on 401: refresh the tokens (once, for every request that met the
    ``stale`` token), else sign in again (a refresh whose answer was lost has spent the
    refresh token)."""
    session = member.session
    async with session.lock:
        if session.access_token != stale:
            return  # another request of this member renewed them meanwhile
        for _ in range(REFRESH_ATTEMPTS_MAX):
            body = {"refresh_token": session.refresh_token}
            if await _take_tokens(client, "/api/v1/auth/refresh", body, session):
                session.refreshes += 1
                return
            await trio.sleep(BACKOFF_S)
        signin = {"email": member.email, "password": PASSWORD}
        if await _take_tokens(client, "/api/v1/auth/signin", signin, session):
            session.signins += 1


async def _take_tokens(client: httpx.AsyncClient, path: str, body: Mapping[str, str],
                       session: Session) -> bool:  # fmt: skip
    try:
        r = await client.post(path, json=body)
        data = r.json() if r.status_code == 200 else None
    except (httpx.HTTPError, json.JSONDecodeError):
        return False
    if not isinstance(data, dict):
        return False
    session.access_token, session.refresh_token = data["access_token"], data["refresh_token"]
    return True


@dataclass
class Recorder:
    """The history; ``index`` orders operations by invocation."""

    ops: list[Op] = field(default_factory=list)
    next_index: int = 0
    started: float = field(default_factory=time.monotonic)

    def claim(self) -> tuple[int, float]:
        self.next_index += 1
        return self.next_index, time.monotonic() - self.started


@dataclass(frozen=True)
class Request:
    f: str
    member: Member
    path: str
    key: str | None
    body: Mapping[str, Any] | None = None
    raw: bytes | None = None  # sent instead of ``body`` (malformed input)
    dest_account: str | None = None


async def send(client: httpx.AsyncClient, rec: Recorder, process: int, req: Request) -> Op:
    """One request, recorded. A 401 is a definite refusal (nothing was done); the member's
    tokens are renewed before this returns, so the caller may send it again."""
    token = req.member.token
    headers = {"Authorization": f"Bearer {token}"}
    if req.key is not None:
        headers["Idempotency-Key"] = req.key
    index, invoked = rec.claim()
    expired_s = token_expired_s(token, time.time())
    status: int | None = None
    response: dict[str, Any] | None = None
    try:
        if req.raw is not None:
            headers["Content-Type"] = "application/json"
            r = await client.post(req.path, content=req.raw, headers=headers)
        else:
            r = await client.post(req.path, json=req.body, headers=headers)
        status = r.status_code
        parsed = r.json()
        response = parsed if isinstance(parsed, dict) else None
    except (httpx.HTTPError, json.JSONDecodeError):
        pass  # no (readable) answer: the outcome is unknown
    outcome = "info" if status is None or status >= 500 else "ok" if status < 300 else "fail"
    op = Op(
        process,
        index,
        req.f,
        req.member.id,
        req.key,
        req.body,
        invoked,
        time.monotonic() - rec.started,
        status,
        outcome,
        response,
        req.dest_account,
        expired_s,
    )
    rec.ops.append(op)
    if status == 401:
        await renew(client, req.member, token)
    return op


async def send_authorized(
    client: httpx.AsyncClient, rec: Recorder, process: int, req: Request
) -> Op:
    """``send``, and again (bounded) while the answer is 401: each is recorded, the tokens
    renewed in between."""
    op = await send(client, rec, process, req)
    for _ in range(UNAUTHORIZED_RESENDS_MAX):
        if op.status != 401:
            break
        op = await send(client, rec, process, req)
    return op


def _payment(
    rng: random.Random, member: Member, members: Sequence[Member], hot_share: float = 0.0
) -> Request:
    roll = rng.random()
    key = str(uuid.uuid4())
    if roll < 0.15:
        return Request(
            "deposit", member, PAYMENTS["deposit"], key, {"amount": rng.randint(100, 3000)}
        )
    if roll < 0.3:
        return Request(
            "withdraw", member, PAYMENTS["withdraw"], key, {"amount": rng.randint(1, 4000)}
        )
    other = rng.choice([m for m in members if m is not member])
    # The die is rolled only when a scenario asks for a hot account: seeds keep their runs.
    if hot_share and member is not members[0] and rng.random() < hot_share:
        other = members[0]
    to = other.email if rng.random() < 0.2 else other.account_id
    return Request(
        "transfer",
        member,
        PAYMENTS["transfer"],
        key,
        {"to": to, "amount": rng.randint(1, 1500)},
        dest_account=other.account_id,
    )


def _bad(
    rng: random.Random, member: Member, members: Sequence[Member], answered: Sequence[Request]
) -> Request:
    """Input the API must refuse with a 4xx, changing nothing."""
    other = rng.choice([m for m in members if m is not member])
    path, key = PAYMENTS["transfer"], str(uuid.uuid4())
    cases: list[tuple[str, Mapping[str, Any] | None, bytes | None]] = [
        ("negative", {"to": other.account_id, "amount": -500}, None),
        ("zero", {"to": other.account_id, "amount": 0}, None),
        ("fraction", {"to": other.account_id, "amount": 1.5}, None),
        ("huge", {"to": other.account_id, "amount": 10**30}, None),
        ("string_amount", {"to": other.account_id, "amount": "100"}, None),
        ("bool_amount", {"to": other.account_id, "amount": True}, None),
        ("extra_field", {"to": other.account_id, "amount": 5, "fee": 0}, None),
        ("self", {"to": member.account_id, "amount": 5}, None),
        ("unknown_email", {"to": f"nobody-{uuid.uuid4().hex[:8]}@example.test", "amount": 5}, None),
        ("unknown_account", {"to": str(uuid.uuid4()), "amount": 5}, None),
        ("not_json", None, b"amount=5"),
        ("bad_utf8", None, b'{"to": "\xff\xfe", "amount": 5}'),
    ]
    reused = [r for r in answered if r.f == "transfer" and r.member is member]
    if reused and rng.random() < 0.25:
        old = rng.choice(reused)
        assert old.body is not None
        changed = {**old.body, "amount": int(old.body["amount"]) + 1}
        return Request("bad:key_reused", member, path, old.key, changed)
    if rng.random() < 0.08:
        return Request("bad:no_key", member, path, None, {"to": other.account_id, "amount": 5})
    name, body, raw = rng.choice(cases)
    return Request(f"bad:{name}", member, path, key, body, raw)


async def _process(
    client: httpx.AsyncClient,
    rec: Recorder,
    process: int,
    members: Sequence[Member],
    p: WorkloadParams,
    deadline: float,
    faults_done: trio.Event,
) -> None:
    rng = random.Random(p.seed * 1_000 + process)
    sent: list[Request] = []
    answered: list[Request] = []  # sent and answered 2xx: their keys are taken
    done = 0
    # At least ``ops_per_process`` operations, and more while the fault timeline still runs: a
    # fault applied after the load had ended would test nothing. The deadline bounds both.
    while done < p.ops_per_process or not faults_done.is_set():
        if time.monotonic() > deadline:
            return
        done += 1
        member = rng.choice(members)
        roll = rng.random()
        if roll < 0.1 and sent:  # a retry, after the first answer: must replay
            await send(client, rec, process, rng.choice(sent))
        elif roll < 0.2:  # the same request several times at once: one transaction
            req = _payment(rng, member, members, p.hot_share)
            sent.append(req)
            if await _burst(client, rec, process, req):
                answered.append(req)
        elif roll < 0.3:
            await send(client, rec, process, _bad(rng, member, members, answered))
        elif roll < 0.35:
            await _read(client, rec, process, member)
        else:
            req = _payment(rng, member, members, p.hot_share)
            sent.append(req)
            if (await _send_until_answered(client, rec, process, req)).outcome == "ok":
                answered.append(req)


async def _burst(client: httpx.AsyncClient, rec: Recorder, process: int, req: Request) -> bool:
    """The same request ``BURST`` times at once; whether any was answered 2xx."""
    outcomes: list[str] = []

    async def one() -> None:
        outcomes.append((await send(client, rec, process, req)).outcome)

    async with trio.open_nursery() as burst:
        for _ in range(BURST):
            burst.start_soon(one)
    return "ok" in outcomes


async def _send_until_answered(
    client: httpx.AsyncClient, rec: Recorder, process: int, req: Request
) -> Op:
    """What a careful client does: no answer (or 503) -> back off, send the same request with
    the same key again, a bounded number of times (a 401, after the tokens' renewal, too).
    The last answer."""
    for attempt in range(UNANSWERED_RETRIES):
        op = await send_authorized(client, rec, process, req)
        if op.outcome != "info":
            return op
        await trio.sleep(BACKOFF_S * (attempt + 1))
    return await send(client, rec, process, req)


async def _read(client: httpx.AsyncClient, rec: Recorder, process: int, member: Member) -> None:
    index, invoked = rec.claim()
    token = member.token
    expired_s = token_expired_s(token, time.time())
    status, body = None, None
    try:
        r = await client.get("/api/v1/accounts/me", headers={"Authorization": f"Bearer {token}"})
        status, body = r.status_code, r.json()
    except (httpx.HTTPError, json.JSONDecodeError):
        pass
    outcome = "info" if status is None or status >= 500 else "ok" if status < 300 else "fail"
    rec.ops.append(
        Op(
            process,
            index,
            "read",
            member.id,
            None,
            None,
            invoked,
            time.monotonic() - rec.started,
            status,
            outcome,
            body,
            token_expired_s=expired_s,
        )
    )
    if status == 401:
        await renew(client, member, token)


def _auth(member: Member) -> dict[str, str]:
    return {"Authorization": f"Bearer {member.token}"}


async def _signup(client: httpx.AsyncClient, n: int) -> Member:
    email = f"w{n}-{uuid.uuid4().hex[:10]}@example.test"
    r = await client.post(
        "/api/v1/auth/signup", json={"email": email, "password": PASSWORD, "name": f"W{n}"}
    )
    if r.status_code != 201:
        raise WorkloadError(f"signup failed: HTTP {r.status_code} {r.text[:200]}")
    data = r.json()
    session = Session(data["access_token"], data["refresh_token"])
    return Member(data["user"]["id"], email, data["user"]["account_id"], session)


class WorkloadError(Exception):
    """The workload could not run (the system is not reachable or refused to set up)."""


async def run(
    api_url: str,
    p: WorkloadParams,
    during: Callable[[], Awaitable[None]] | None = None,
    steady: Callable[[], Awaitable[bool]] | None = None,
    *,
    recorder: Recorder | None = None,
) -> tuple[list[Op], list[Member]]:
    """Sign the users up, fund them, then run the processes; returns the history. ``during``
    (a fault timeline) runs alongside the processes only: they keep going until it has run
    to its end (within ``seconds_max``), and it is cancelled if they end first. ``steady`` (a
    steady-state hypothesis) is asked once the users are funded: False, and neither the
    processes nor ``during`` run. ``recorder``: the one to use (its ``started`` is the zero of
    the history's timestamps)."""
    rec = Recorder() if recorder is None else recorder
    limits = httpx.Limits(max_connections=p.processes * BURST + 8)
    async with httpx.AsyncClient(
        base_url=api_url, timeout=REQUEST_TIMEOUT_S, limits=limits
    ) as client:
        members = [await _signup(client, n) for n in range(p.users)]
        for m in members:
            await send_authorized(
                client,
                rec,
                -1,
                Request(
                    "deposit",
                    m,
                    PAYMENTS["deposit"],
                    str(uuid.uuid4()),
                    {"amount": p.initial_deposit},
                ),
            )
        if steady is not None and not await steady():
            return sorted(rec.ops, key=lambda op: op.index), members
        deadline = time.monotonic() + p.seconds_max
        faults_done = trio.Event()

        async def faults() -> None:
            try:
                if during is not None:
                    await during()
            finally:
                faults_done.set()

        async with trio.open_nursery() as outer:
            outer.start_soon(faults)
            async with trio.open_nursery() as nursery:
                for process in range(p.processes):
                    nursery.start_soon(
                        _process, client, rec, process, members, p, deadline, faults_done
                    )
            outer.cancel_scope.cancel()
    return sorted(rec.ops, key=lambda op: op.index), members


async def converge_and_read(
    api_url: str,
    database_url: str,
    members: Sequence[Member],
    p: WorkloadParams,
    bank_url: str | None = None,
    redis_url: str | None = None,
) -> FinalState:
    """Wait (bounded) until every transaction of the members is final, then read the state
    (the bank's statement too, when ``bank_url`` is given; the settlement jobs' records when
    ``redis_url`` is)."""
    accounts = [uuid.UUID(m.account_id) for m in members]
    async with trio_asyncio.open_loop():
        deadline = time.monotonic() + p.converge_s_max
        while await trio_asyncio.aio_as_trio(_open_count)(database_url, accounts):
            if time.monotonic() > deadline:
                break  # the checker reports what is still open
            await trio.sleep(CONVERGE_POLL_S)
        ledger = await trio_asyncio.aio_as_trio(_read_ledger)(database_url, members)
    async with httpx.AsyncClient(base_url=api_url, timeout=REQUEST_TIMEOUT_S) as client:
        views = {m.id: await _view(client, m) for m in members}
    bank = None if bank_url is None else await _bank(bank_url, {m.account_id for m in members})
    jobs = None if redis_url is None else await trio.to_thread.run_sync(jobs_done, redis_url)
    return FinalState(views=views, bank=bank, jobs_done=jobs, **ledger)


JOB_PATTERN = "saq:job:settle-*"  # SAQ's record of each job (kept JOB_TTL_S after it ends)
JOB_SCANS_MAX = 10_000
JOB_SCAN_COUNT = 1000


def jobs_done(redis_url: str) -> dict[str, float]:
    """Each transaction's first settlement job that SAQ marked complete: txn id -> when
    (epoch seconds). Read from SAQ's job records (settle: one intent; settle_many: a group)."""
    import redis

    done: dict[str, float] = {}
    with redis.Redis.from_url(redis_url, socket_timeout=10) as client:
        cursor, scans = 0, 0
        while scans < JOB_SCANS_MAX:  # bounded: far more records than any run leaves
            cursor, keys = client.scan(cursor, match=JOB_PATTERN, count=JOB_SCAN_COUNT)
            scans += 1
            for raw in client.mget(keys) if keys else []:
                _note_job(raw, done)
            if cursor == 0:
                break
    return done


def _note_job(raw: bytes | None, done: dict[str, float]) -> None:
    try:
        job = json.loads(raw or b"null")
    except (UnicodeDecodeError, json.JSONDecodeError):
        return
    if not isinstance(job, dict) or job.get("status") != "complete" or not job.get("completed"):
        return
    kwargs = job.get("kwargs") or {}
    txns = [kwargs["txn_id"]] if "txn_id" in kwargs else [t for t, _a in kwargs.get("items", [])]
    completed_s = int(job["completed"]) / 1000
    for txn in txns:
        done[str(txn)] = min(done.get(str(txn), completed_s), completed_s)


async def _bank(bank_url: str, accounts: set[str]) -> dict[str, tuple[str, int]]:
    """The bank statement's payments for ``accounts``: key -> (kind, amount)."""
    paid: dict[str, tuple[str, int]] = {}
    since: str | None = None
    async with httpx.AsyncClient(base_url=bank_url, timeout=REQUEST_TIMEOUT_S) as client:
        for _ in range(10_000):  # bounded: pages of 1000
            params = {"limit": "1000", **({"since": since} if since else {})}
            page = (await client.get("/statement", params=params)).json()
            for item in page["items"]:
                if item["account"] in accounts:
                    paid[item["key"]] = (item["kind"], int(item["amount_minor"]))
            if page.get("next_cursor") is None or not page["items"]:
                break
            since = page["next_cursor"]
    return paid


async def _open_count(database_url: str, accounts: list[uuid.UUID]) -> int:
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        count = await conn.fetchval(
            "SELECT count(*) FROM transactions WHERE (source_id = ANY($1) OR dest_id = ANY($1))"
            " AND status <> ALL($2::text[])",
            accounts,
            sorted(FINAL),
            timeout=10,
        )
        return int(count)
    finally:
        await conn.close()


async def _read_ledger(database_url: str, members: Sequence[Member]) -> dict[str, Any]:
    from engine import audit

    accounts = [uuid.UUID(m.account_id) for m in members]
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            txns = await conn.fetch(
                "SELECT id, kind, source_id, dest_id, amount_minor, status,"
                " extract(epoch FROM coalesce(settled_at, failed_at))::float8 AS final_at_s"
                " FROM transactions WHERE source_id = ANY($1) OR dest_id = ANY($1)",
                accounts,
            )
            keys = await conn.fetch(
                "SELECT scope, key, transaction_id FROM idempotency_keys WHERE scope = ANY($1)",
                [m.id for m in members],
            )
            balances = await conn.fetch(
                "SELECT account_id, posted, pending FROM balances WHERE account_id = ANY($1)",
                accounts,
            )
            total = await conn.fetchval("SELECT coalesce(sum(amount_minor), 0) FROM postings")
            findings = await audit(conn)
    finally:
        await conn.close()
    return {
        "accounts": {m.id: m.account_id for m in members},
        "transactions": {
            str(r["id"]): LedgerTxn(
                str(r["id"]),
                r["kind"],
                str(r["source_id"]),
                str(r["dest_id"]),
                r["amount_minor"],
                r["status"],
                r["final_at_s"],
            )
            for r in txns
        },
        "keys": {
            (r["scope"], r["key"]): None
            if r["transaction_id"] is None
            else str(r["transaction_id"])
            for r in keys
        },
        "balances": {str(r["account_id"]): (r["posted"], r["pending"]) for r in balances},
        "postings_total": int(total),
        "audit": [(f.check, f.subject, f.detail) for f in findings],
    }


async def _get(client: httpx.AsyncClient, member: Member, path: str,
               params: Mapping[str, str] | None = None) -> httpx.Response:  # fmt: skip
    """A GET of the final reads; its token renewed (bounded) while the answer is 401."""
    for _ in range(UNAUTHORIZED_RESENDS_MAX):
        token = member.token
        r = await client.get(path, params=params, headers={"Authorization": f"Bearer {token}"})
        if r.status_code != 401:
            return r
        await renew(client, member, token)
    return await client.get(path, params=params, headers=_auth(member))


async def _view(client: httpx.AsyncClient, member: Member) -> ApiView:
    me = (await _get(client, member, "/api/v1/accounts/me")).json()
    history: list[dict[str, Any]] = []
    cursor: str | None = None
    for _ in range(10_000):  # bounded: far more pages than any run makes
        params = {"limit": str(HISTORY_PAGE), **({"cursor": cursor} if cursor else {})}
        page = (await _get(client, member, "/api/v1/transactions", params)).json()
        history.extend(page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    text = (await _get(client, member, "/api/v1/transactions/export.csv")).text
    rows = list(csv.DictReader(io.StringIO(text)))
    return ApiView(me["posted"], me["pending"], me["available"], history, rows)
