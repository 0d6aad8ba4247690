"""One typed configuration object, built from the environment once at start-up and passed down.

Nothing below the CLI reads ``os.environ``: every process builds a ``Config`` with
``Config.from_env()`` and hands the parts it needs to the code it runs.
"""

from __future__ import annotations

import base64
import dataclasses
import hmac
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path


class ConfigError(ValueError):
    """An environment variable holds a value Kizo cannot use."""


# Deliberately broken builds, each removing one safeguard (docs/chaos.md says which scenario and
# which checker rule catch each). Read from Config and handed down to the code owning the
# safeguard; "" is the real build.
MUTATION_HELP = {
    "idempotency_off": "the API stores no idempotency record: a retried request pays again",
    "final_state_guard_off": "the ledger applies an op whatever state its intent is already in:"
    " a re-driven job moves the money again",
    "row_locks_off": "the batch apply reads balances without FOR NO KEY UPDATE: concurrent"
    " batches overwrite each other's balance (a lost update)",
    "unknown_as_failed": "the bank client reports a lost answer as a refusal: a payment the"
    " bank made is failed (and its hold released) in the ledger",
    "bank_key_off": "the bank client keys each request with a fresh id, not the transaction"
    " id: a retried or re-issued payment is a new payment",
    "unknown_as_succeeded": "the bank client reports a lost answer as a success: a collection"
    " the bank never made (the request lost on its way) is credited, creating money",
}
MUTATIONS = ("", *MUTATION_HELP)
# A mutation is honoured only inside a scratch system (infra/system.py): it writes a random token
# into this file of its temporary KIZO_HOME and hands the same token to its processes in
# SCRATCH_MARK_VAR. Both have to match, so no operator can set KIZO_MUTATION on a real system by
# accident (the file is gone with the scratch home, the token is never printed).
SCRATCH_MARKER_FILE = "scratch-system"
SCRATCH_MARK_VAR = "KIZO_SCRATCH_MARK"
SCRATCH_TOKEN_CHARS_MIN = 32
# The pepper every checkout knows (earlier builds used it by default): never accepted by the API.
DEV_PEPPER = "kizo-dev-pepper-change-me"
PEPPER_CHARS_MIN = 16
KEYRING_KEY_BYTES = 32  # AES-256-GCM


def _choice(env: Mapping[str, str], name: str, allowed: tuple[str, ...]) -> str:
    raw = env.get(name, "")
    if raw not in allowed:
        raise ConfigError(
            f"{name} must be one of {', '.join(a for a in allowed if a)}, got {raw!r}"
        )
    return raw


def _int(env: Mapping[str, str], name: str, default: int, *, low: int, high: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if not low <= value <= high:
        raise ConfigError(f"{name} must be between {low} and {high}, got {value}")
    return value


def _float(env: Mapping[str, str], name: str, default: float, *, low: float, high: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if not low <= value <= high:
        raise ConfigError(f"{name} must be between {low} and {high}, got {value}")
    return value


def _str(env: Mapping[str, str], name: str, default: str) -> str:
    raw = env.get(name)
    return default if raw is None or raw == "" else raw


def _optional(env: Mapping[str, str], name: str) -> str | None:
    raw = env.get(name)
    return None if raw is None or raw.strip() == "" else raw.strip()


@dataclass(frozen=True)
class LedgerConfig:
    """Limits of the ledger engine; every one is a bound on work or money."""

    currency: str = "USD"
    # One transfer may move at most this many minor units (1e12 = 10 billion dollars in cents).
    amount_max_minor: int = 1_000_000_000_000
    batch_size_max: int = 1000
    retry_attempts_max: int = 8
    retry_backoff_base_s: float = 0.005
    retry_backoff_max_s: float = 0.25
    statement_timeout_ms: int = 10_000


@dataclass(frozen=True)
class PipelineConfig:
    """Shards, actors and the worker process (issue 2/8)."""

    shards: int = 8
    worker_concurrency: int = 400
    mailbox_size_max: int = 1000
    actor_batch_size_max: int = 200
    actor_batch_wait_ms: int = 2
    actor_idle_evict_s: float = 30.0
    janitor_interval_s: float = 5.0
    redrive_after_s: float = 10.0
    redrive_attempts_max: int = 10
    redrive_backoff_base_s: float = 2.0
    redrive_backoff_max_s: float = 300.0
    # How often one deposit or withdrawal flagged needs_attention is re-armed automatically when
    # the bank answers again (docs/pipeline.md); past it only an operator re-arms it.
    rearm_max: int = 3
    # Longer than the bank client's worst case (timeout x attempts): a request still in flight
    # is never taken for a lost one.
    resolve_after_s: float = 30.0
    reconcile_grace_s: float = 60.0
    janitor_batch_max: int = 1000
    janitor_metrics_port: int = 8201
    worker_metrics_port: int = 8210  # worker i of kizo up serves /metrics on this port + i
    bank_timeout_s: float = 5.0
    bank_retries_max: int = 3
    # A `kizo worker --lease` that stops renewing (dead, paused, cut off) loses its shards after
    # this long; the others take them at their next round (a third of it).
    shard_lease_ttl_s: float = 10.0
    worker_leases: bool = False  # kizo up's workers hold shards by lease (KIZO_WORKER_LEASES=1)


@dataclass(frozen=True)
class PoolsConfig:
    """Connection pools and the fan-outs over them (infra.db). A pool that is full makes its
    callers wait up to ``wait_s`` for a connection, never fail at once; every fan-out over a
    pool is bounded below the pool's size."""

    wait_s: float = 10.0  # the longest wait for a free PostgreSQL or Redis connection
    redis_socket_timeout_s: float = 5.0
    redis_connect_timeout_s: float = 2.0
    # Per API process: requests (refresh tokens, readiness) and the enqueue flusher share it;
    # the rate limiter has a pool of the same size of its own.
    api_redis_connections_max: int = 64
    janitor_redis_connections_max: int = 8
    janitor_pg_connections_max: int = 3
    # Enqueues one QueueSet has in Redis at once (grouped jobs of a flush, intents of a relay).
    enqueue_concurrency_max: int = 16


@dataclass(frozen=True)
class AuthConfig:
    """Password hashing and tokens (issue 3/8)."""

    # Secrets: unset by default; the API refuses to start without them (infra/devsecrets.py makes
    # them for `kizo up`'s embedded development system and for scratch systems).
    pepper: str = field(default="", repr=False)
    keyring_key: bytes = field(default=b"", repr=False)  # seals the JWT signing keys at rest
    # OWASP's fifth configuration (m = 7 MiB, t = 5): as strong as its others by OWASP's own
    # account, and the cheapest in CPU on this machine kind (18 ms a hash against 25 ms for
    # m = 19 MiB, t = 2; docs/api.md). Hashes made with other parameters still verify.
    argon2_memory_kib: int = 7 * 1024
    argon2_time_cost: int = 5
    argon2_parallelism: int = 1
    hash_processes: int = 1
    # Hashing's share of a core adapts (api/_hashing.py HashBudget): it halves whenever a payment
    # took longer than hash_target_ms, down to hash_share_min_pct, and grows back otherwise.
    hash_target_ms: int = 100
    hash_share_min_pct: int = 5
    hash_hold_ms: int = 100  # the longest one hash is paused, in all, for payments in flight
    # A sign-in waits at most this long for a hashing process; one that would wait longer is
    # refused at once (503 + Retry-After). The line is bounded too.
    signin_deadline_s: float = 10.0
    # A sign-in that has waited this long is urgent: its hash skips the budget's rests and
    # pauses and runs at normal CPU priority, so the line drains within the deadline even when
    # payments keep the CPU busy (at most hash_processes cores, and only while such a line lasts).
    signin_urgent_s: float = 2.5
    hash_waiting_max: int = 1024
    access_ttl_s: int = 900
    refresh_ttl_s: int = 30 * 24 * 3600
    # How stale an API process's key ring may be: `kizo keys rotate` reaches every running
    # process within this time, with no restart.
    keyring_reload_s: float = 5.0
    # How long an API process trusts the user row it read for an access token (role, account).
    user_cache_s: float = 5.0


# OWASP's Argon2id configurations, equal in strength (memory KiB, passes): no weaker setting is
# accepted. A smaller memory with more passes keeps hashing inside the CPU caches that payments
# share with it.
ARGON2_OWASP_FLOOR = ((47_104, 1), (19_456, 2), (12_288, 3), (9_216, 4), (7_168, 5))


def _http_url(env: Mapping[str, str], name: str) -> str | None:
    value = _optional(env, name)
    if value is not None and not value.startswith(("http://", "https://")):
        raise ConfigError(f"{name} must be an http:// or https:// URL, got {value!r}")
    return value.rstrip("/") if value else None


def _networks(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    """Comma-separated IP addresses or networks (CIDR), each checked."""
    found = []
    for item in (i.strip() for i in _str(env, name, "").split(",")):
        if not item:
            continue
        try:
            found.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError:
            raise ConfigError(f"{name} takes IP addresses or networks, got {item!r}") from None
    return tuple(found)


def keyring_key(raw: str | None) -> bytes:
    """The 32-byte key of ``KIZO_KEYRING_KEY`` (base64url), or b"" when unset."""
    if raw is None or raw.strip() == "":
        return b""
    raw = raw.strip()
    try:
        key = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4))
    except ValueError:
        key = b""
    if len(key) != KEYRING_KEY_BYTES:
        raise ConfigError(
            f"KIZO_KEYRING_KEY must be {KEYRING_KEY_BYTES} random bytes in base64url (make one"
            " with: python -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    return key


def _mutation(env: Mapping[str, str], home: Path) -> str:
    mutation = _choice(env, "KIZO_MUTATION", MUTATIONS)
    if mutation and not _inside_scratch_system(env, home):
        raise ConfigError(
            "KIZO_MUTATION (a deliberately broken build) is honoured only inside the scratch"
            " systems that tests and `kizo chaos ... --mutation` start; unset it"
        )
    return mutation


def _inside_scratch_system(env: Mapping[str, str], home: Path) -> bool:
    token = env.get(SCRATCH_MARK_VAR, "")
    try:
        marker = (home / SCRATCH_MARKER_FILE).read_text().strip()
    except OSError:
        return False
    return len(token) >= SCRATCH_TOKEN_CHARS_MIN and hmac.compare_digest(marker, token)


def _auth(env: Mapping[str, str]) -> AuthConfig:
    d = AuthConfig
    memory_kib = _int(env, "KIZO_ARGON2_MEMORY_KIB", d.argon2_memory_kib, low=7_168, high=1 << 22)
    time_cost = _int(env, "KIZO_ARGON2_TIME_COST", d.argon2_time_cost, low=1, high=64)
    if not any(memory_kib >= m and time_cost >= t for m, t in ARGON2_OWASP_FLOOR):
        raise ConfigError(
            f"Argon2id m={memory_kib} KiB, t={time_cost} is weaker than OWASP's minimum"
            " (one of m=47104/t=1, 19456/2, 12288/3, 9216/4, 7168/5)"
        )
    return AuthConfig(
        pepper=_str(env, "KIZO_PEPPER", d.pepper),
        keyring_key=keyring_key(env.get("KIZO_KEYRING_KEY")),
        argon2_memory_kib=memory_kib,
        argon2_time_cost=time_cost,
        hash_processes=_int(env, "KIZO_HASH_PROCESSES", d.hash_processes, low=1, high=64),
        hash_target_ms=_int(env, "KIZO_HASH_TARGET_MS", d.hash_target_ms, low=1, high=60_000),
        hash_share_min_pct=_int(
            env, "KIZO_HASH_SHARE_MIN_PCT", d.hash_share_min_pct, low=1, high=100
        ),
        signin_deadline_s=_float(
            env, "KIZO_SIGNIN_DEADLINE_S", d.signin_deadline_s, low=0.1, high=300
        ),
        signin_urgent_s=_float(env, "KIZO_SIGNIN_URGENT_S", d.signin_urgent_s, low=0.0, high=300),
        hash_waiting_max=_int(
            env, "KIZO_HASH_WAITING_MAX", d.hash_waiting_max, low=1, high=100_000
        ),
        hash_hold_ms=_int(env, "KIZO_HASH_HOLD_MS", d.hash_hold_ms, low=0, high=10_000),
        # Short only in tests and demos of the web dashboard's refresh (docs/web.md).
        access_ttl_s=_int(env, "KIZO_ACCESS_TTL_S", d.access_ttl_s, low=1, high=86_400),
        keyring_reload_s=_float(
            env, "KIZO_KEYRING_RELOAD_S", d.keyring_reload_s, low=0.1, high=3600
        ),
    )


@dataclass(frozen=True)
class RateLimitConfig:
    """Requests per minute; shared by every API process through Redis."""

    enabled: bool = True
    signin_per_ip: int = 30
    signin_per_email: int = 10
    signup_per_ip: int = 10
    payments_per_user: int = 300
    default_per_ip: int = 1200
    cors_origins: tuple[str, ...] = ()
    # Peers (addresses or networks) whose X-Forwarded-For names the client: the gateway in
    # front of the API. Empty: the connection's own address is the client, whatever it sends.
    trusted_proxies: tuple[str, ...] = ()


@dataclass(frozen=True)
class Config:
    """Everything a Kizo process needs to know about where it runs."""

    home: Path
    database_url: str | None = None
    redis_url: str | None = None
    host: str = "127.0.0.1"
    pg_port: int = 15432
    redis_port: int = 16379
    api_port: int = 8000
    bank_port: int = 8100
    proxy_api_port: int = 8474
    chaos_metrics_port: int = 0  # `kizo chaos run` serves /metrics here; 0: a free port
    grafana_url: str = ""  # KIZO_GRAFANA_URL: chaos runs post their fault windows there
    grafana_token: str = field(default="", repr=False)  # KIZO_GRAFANA_TOKEN
    # KIZO_CHAOS_RUNS_DIR: where the operations console reads chaos journals (`kizo chaos run`
    # writes chaos-runs/ under its working directory unless told otherwise).
    chaos_runs_dir: Path = field(default_factory=lambda: Path("chaos-runs"))
    prometheus_port: int = 9090  # kizo up's Prometheus, when its binary is found; 0: none
    proxy_file: str = ""  # the fault proxy's proxies: "" the shipped file, "none" no proxies
    bank_url_override: str | None = None  # KIZO_BANK_URL: where workers reach the bank
    workers: int = 1
    api_workers: int = 1  # granian worker processes of `kizo api`
    pg_fsync: bool = True
    # A deliberately broken build, for showing that the chaos checker catches one. Honoured
    # only inside a scratch system (any other process refuses to start with it); every process
    # that honours it says so loudly at start.
    mutation: str = ""
    ledger: LedgerConfig = field(default_factory=LedgerConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    pools: PoolsConfig = field(default_factory=PoolsConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    limits: RateLimitConfig = field(default_factory=RateLimitConfig)

    @property
    def embedded_postgres(self) -> bool:
        return self.database_url is None

    @property
    def embedded_redis(self) -> bool:
        return self.redis_url is None

    @property
    def pg_data_dir(self) -> Path:
        return self.home / "pgdata"

    @property
    def redis_data_dir(self) -> Path:
        return self.home / "valkey"

    def pg_url(self, database: str = "kizo") -> str:
        if self.database_url is not None:
            return self.database_url
        return f"postgresql://postgres@{self.host}:{self.pg_port}/{database}"

    def valkey_url(self) -> str:
        if self.redis_url is not None:
            return self.redis_url
        return f"redis://{self.host}:{self.redis_port}/0"

    def proxied_services(self) -> dict[str, str]:
        """Where the services that fault proxies stand in front of run: name -> host:port."""
        return {
            "postgres": f"{self.host}:{self.pg_port}",
            "redis": f"{self.host}:{self.redis_port}",
            "bank": f"{self.host}:{self.bank_port}",
        }

    def bank_url(self) -> str:
        """Where Kizo's workers and janitor reach the bank (the bank itself serves bank_port)."""
        return self.bank_url_override or f"http://{self.host}:{self.bank_port}"

    def with_urls(self, database_url: str, redis_url: str | None) -> Config:
        return dataclasses.replace(self, database_url=database_url, redis_url=redis_url)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Config:
        env = os.environ if env is None else env
        home = Path(_str(env, "KIZO_HOME", str(Path.cwd() / ".kizo"))).expanduser().resolve()
        currency = _str(env, "KIZO_CURRENCY", "USD").upper()
        if len(currency) != 3 or not currency.isalpha():
            raise ConfigError(f"KIZO_CURRENCY must be a 3-letter code, got {currency!r}")
        ledger = LedgerConfig(
            currency=currency,
            amount_max_minor=_int(
                env, "KIZO_AMOUNT_MAX_MINOR", LedgerConfig.amount_max_minor, low=1, high=2**62
            ),
            batch_size_max=_int(env, "KIZO_BATCH_SIZE_MAX", 1000, low=1, high=100_000),
        )
        pipeline = PipelineConfig(
            shards=_int(env, "KIZO_SHARDS", PipelineConfig.shards, low=1, high=1024),
            worker_concurrency=_int(env, "KIZO_WORKER_CONCURRENCY", 400, low=1, high=10_000),
            janitor_interval_s=_float(env, "KIZO_JANITOR_INTERVAL_S", 5.0, low=0.05, high=3600),
            redrive_after_s=_float(env, "KIZO_REDRIVE_AFTER_S", 10.0, low=0.05, high=86_400),
            redrive_attempts_max=_int(env, "KIZO_REDRIVE_ATTEMPTS_MAX", 10, low=1, high=1000),
            redrive_backoff_base_s=_float(
                env, "KIZO_REDRIVE_BACKOFF_BASE_S", 2.0, low=0.05, high=3600
            ),
            redrive_backoff_max_s=_float(
                env, "KIZO_REDRIVE_BACKOFF_MAX_S", 300.0, low=0.05, high=86_400
            ),
            rearm_max=_int(env, "KIZO_REARM_MAX", 3, low=0, high=1000),
            resolve_after_s=_float(env, "KIZO_RESOLVE_AFTER_S", 30.0, low=0.0, high=86_400),
            reconcile_grace_s=_float(env, "KIZO_RECONCILE_GRACE_S", 60.0, low=0.0, high=86_400),
            janitor_metrics_port=_int(env, "KIZO_JANITOR_METRICS_PORT", 8201, low=1, high=65535),
            worker_metrics_port=_int(env, "KIZO_WORKER_METRICS_PORT", 8210, low=1, high=65535 - 64),
            bank_timeout_s=_float(env, "KIZO_BANK_TIMEOUT_S", 5.0, low=0.05, high=120),
            shard_lease_ttl_s=_float(
                env, "KIZO_SHARD_LEASE_TTL_S", PipelineConfig.shard_lease_ttl_s, low=0.3, high=600
            ),
            worker_leases=_int(env, "KIZO_WORKER_LEASES", 0, low=0, high=1) == 1,
        )
        pools = PoolsConfig(
            wait_s=_float(env, "KIZO_POOL_WAIT_S", PoolsConfig.wait_s, low=0.1, high=600),
            api_redis_connections_max=_int(
                env, "KIZO_API_REDIS_CONNECTIONS_MAX", 64, low=4, high=10_000
            ),
            enqueue_concurrency_max=_int(
                env, "KIZO_ENQUEUE_CONCURRENCY_MAX", 16, low=1, high=1_000
            ),
        )
        auth = _auth(env)
        per_minute = {"low": 1, "high": 1_000_000}
        limits = RateLimitConfig(
            enabled=_str(env, "KIZO_RATE_LIMITS", "on").lower() not in {"off", "0", "false", "no"},
            signin_per_ip=_int(env, "KIZO_RATE_SIGNIN_PER_IP", 30, **per_minute),
            signin_per_email=_int(env, "KIZO_RATE_SIGNIN_PER_EMAIL", 10, **per_minute),
            signup_per_ip=_int(env, "KIZO_RATE_SIGNUP_PER_IP", 10, **per_minute),
            payments_per_user=_int(env, "KIZO_RATE_PAYMENTS_PER_USER", 300, **per_minute),
            default_per_ip=_int(env, "KIZO_RATE_DEFAULT_PER_IP", 1200, **per_minute),
            cors_origins=tuple(
                o.strip() for o in _str(env, "KIZO_CORS_ORIGINS", "").split(",") if o.strip()
            ),
            trusted_proxies=_networks(env, "KIZO_TRUSTED_PROXIES"),
        )
        return cls(
            home=home,
            database_url=_optional(env, "DATABASE_URL"),
            redis_url=_optional(env, "REDIS_URL"),
            host=_str(env, "KIZO_HOST", "127.0.0.1"),
            pg_port=_int(env, "KIZO_PG_PORT", 15432, low=1, high=65535),
            redis_port=_int(env, "KIZO_REDIS_PORT", 16379, low=1, high=65535),
            api_port=_int(env, "KIZO_API_PORT", 8000, low=1, high=65535),
            bank_port=_int(env, "KIZO_BANK_PORT", 8100, low=1, high=65535),
            proxy_api_port=_int(env, "KIZO_PROXY_API_PORT", 8474, low=0, high=65535),
            chaos_metrics_port=_int(env, "KIZO_CHAOS_METRICS_PORT", 0, low=0, high=65535),
            grafana_url=env.get("KIZO_GRAFANA_URL", ""),
            grafana_token=env.get("KIZO_GRAFANA_TOKEN", ""),
            chaos_runs_dir=Path(_str(env, "KIZO_CHAOS_RUNS_DIR", "chaos-runs")).expanduser(),
            prometheus_port=_int(env, "KIZO_PROMETHEUS_PORT", 9090, low=0, high=65535),
            proxy_file=_str(env, "KIZO_PROXY_FILE", ""),
            bank_url_override=_http_url(env, "KIZO_BANK_URL"),
            workers=_int(env, "KIZO_WORKERS", 1, low=1, high=64),
            api_workers=_int(env, "KIZO_API_WORKERS", 1, low=1, high=16),
            pg_fsync=_str(env, "KIZO_PG_FSYNC", "on").lower() not in {"off", "0", "false", "no"},
            ledger=ledger,
            pipeline=pipeline,
            pools=pools,
            auth=auth,
            limits=limits,
            mutation=_mutation(env, home),
        )
