"""The restore drill of docs/operations.md, as written there: dump the database with pg_dump,
restore it into a scratch database with pg_restore, and audit the copy with ``kizo janitor
--once`` pointed at a Valkey database no worker reads and at a bank that answers nothing. A
clean copy passes; a copy whose ledger does not add up fails the drill."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import asyncpg

from engine import Action, NewIntent, Op, apply_batch
from infra.servers import free_port, pg_bin_dir
from tests._ledger_helpers import funded, intents
from tests.conftest import ServerSet, kizo_env, template_database

ROOT = Path(__file__).resolve().parent.parent
# The Valkey database the drill's re-drives go to: one that no worker of the suite reads.
DRILL_REDIS_DB = 15
TOOL_TIMEOUT_S = 60


async def _some_history(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        alice, bob = await funded(conn, [5_000, 0])
        [paid] = await intents(conn, [NewIntent("transfer", alice, bob, 1_250)])
        await apply_batch(conn, [Op(paid, Action.TRANSFER)])
        await intents(conn, [NewIntent("transfer", bob, alice, 250)])  # still pending
    finally:
        await conn.close()


def _tool(name: str, *args: str) -> None:
    subprocess.run([str(pg_bin_dir() / name), *args], check=True, capture_output=True,
                   timeout=TOOL_TIMEOUT_S)  # fmt: skip


def _drill(servers: ServerSet, scratch_url: str) -> subprocess.CompletedProcess[str]:
    redis = servers.redis_url.rsplit("/", 1)[0] + f"/{DRILL_REDIS_DB}"
    env = kizo_env(servers, scratch_url, REDIS_URL=redis,
                   KIZO_BANK_URL=f"http://127.0.0.1:{free_port()}")  # fmt: skip
    return subprocess.run([sys.executable, "-m", "kizo.cli", "janitor", "--once"], env=env,
                          capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, cwd=ROOT,
                          check=False)  # fmt: skip


async def _corrupt(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            "UPDATE balances SET posted = posted + 1"
            " WHERE account_id = (SELECT account_id FROM balances ORDER BY account_id LIMIT 1)"
        )
    finally:
        await conn.close()


def test_a_restored_dump_audits_clean_and_a_damaged_one_does_not(
    servers: ServerSet, sync_db_url: str, db_name: str, tmp_path: Path
) -> None:
    asyncio.run(_some_history(sync_db_url))
    dump = tmp_path / "kizo.dump"
    _tool("pg_dump", "-Fc", "-f", str(dump), "-d", sync_db_url)
    with template_database(servers, f"{db_name}_drill", template=None) as scratch:
        _tool("pg_restore", "--no-owner", "-d", scratch, str(dump))
        clean = _drill(servers, scratch)
        assert clean.returncode == 0, clean.stdout + clean.stderr
        assert "findings=0" in clean.stdout and "bank_ok=False" in clean.stdout
        assert not [line for line in clean.stdout.splitlines() if line.startswith("finding ")]
        asyncio.run(_corrupt(scratch))
        damaged = _drill(servers, scratch)
        assert damaged.returncode == 1, damaged.stdout + damaged.stderr
        assert "finding audit" in damaged.stdout
