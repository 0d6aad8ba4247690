"""The web pages as the API serves them (no browser: tests/test_web_browser.py drives one), the
landing page's figures read from the docs, and the admin routes behind the operations console."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import pytest_asyncio
from quart.typing import TestClientProtocol as Client

from api import _console as console
from api import _web as web
from api._openapi import ChaosRunsOut, FaultsOut, OverviewOut
from api.app import create_app
from infra.config import Config, ConfigError, RateLimitConfig
from infra.servers import free_port
from tests._api_helpers import bearer, signup
from tests.conftest import TEST_SECRETS, ServerSet

ROOT = Path(__file__).resolve().parents[1]
PAGES = ("/", "/app", "/app/console")


@pytest_asyncio.fixture
async def client(servers: ServerSet, db_url: str, redis_client: object,
                 tmp_path: Path) -> AsyncIterator[Client]:  # fmt: skip
    runs = tmp_path / "chaos-runs"
    (runs / "pg-crash-seed2").mkdir(parents=True)
    (runs / "pg-crash-seed2" / "journal.json").write_text(json.dumps(
        {"scenario": "pg-crash", "seed": 2, "mutation": "row_locks_off", "violations": 9,
         "checker": {"verdict": "fail", "violations": 9}, "figures": {"lag_ms": {"p99": 6790}},
         "convergence": {"seconds": None}}))  # fmt: skip
    (runs / "broken").mkdir()
    (runs / "broken" / "journal.json").write_text("{not json")
    base = Config.from_env(TEST_SECRETS)
    nowhere = free_port()  # no janitor, worker or fault proxy listens here
    config = dataclasses.replace(
        base,
        database_url=db_url,
        redis_url=servers.redis_url,
        limits=RateLimitConfig(enabled=False),
        chaos_runs_dir=runs,
        grafana_url="javascript:alert(1)",
        proxy_api_port=nowhere,
        pipeline=dataclasses.replace(
            base.pipeline, janitor_metrics_port=nowhere, worker_metrics_port=nowhere
        ),
    )
    async with create_app(config).test_app() as app:
        yield app.test_client()


def _scripts(html: str) -> list[tuple[str, str]]:
    return re.findall(r"<script([^>]*)>(.*?)</script>", html, flags=re.S)


@pytest.mark.asyncio
async def test_pages_are_html_with_a_strict_policy_and_no_inline_script(client: Client) -> None:
    for path in PAGES:
        answer = await client.get(path)
        assert answer.status_code == 200, path
        assert answer.content_type == "text/html; charset=utf-8"
        policy = answer.headers["Content-Security-Policy"]
        assert "script-src 'self'" in policy and "unsafe-inline" not in policy
        assert "frame-ancestors 'none'" in policy
        html = await answer.get_data(as_text=True)
        assert '<html lang="en">' in html and 'name="viewport"' in html
        scripts = _scripts(html)
        assert all(body.strip() == "" and 'src="/app/js/' in attrs for attrs, body in scripts)
        assert not re.search(r"<[^>]+\son[a-z]+=", html), path  # no inline handlers
        for asset in re.findall(r'(?:src|href)="(/app/(?:js|css)/[^"]+)"', html):
            loaded = await client.get(asset)
            assert loaded.status_code == 200, asset


@pytest.mark.asyncio
async def test_assets_have_their_types_and_unknown_names_are_404_problems(
    client: Client,
) -> None:
    script = await client.get("/app/js/session.js")
    assert (script.status_code, script.content_type) == (200, "text/javascript; charset=utf-8")
    style = await client.get("/app/css/kizo.css")
    assert (style.status_code, style.content_type) == (200, "text/css; charset=utf-8")
    for path in ("/app/js/nope.js", "/app/css/session.css", "/app/js/..%2Fweb.js",
                 "/app/js/kizo.css.js", "/app/static/js/session.js"):  # fmt: skip
        answer = await client.get(path)
        assert answer.status_code == 404, path
        assert answer.content_type == "application/problem+json"


def test_every_module_a_script_imports_is_served() -> None:
    served = web.static_files()
    for name in served:
        if name.endswith(".js"):
            text = served[name][0].decode()
            for imported in re.findall(r'from "\./([^"]+)"', text):
                assert f"js/{imported}" in served, (name, imported)


MARKDOWN = """# Benchmarks
## Old
| round | ledger random / pgbench | ledger hot / random | pipeline settled / pgbench | lag p99 (ms) | api accepted / pgbench |
|---|---|---|---|---|---|
| 1 | 1.00 | 1.00 | 1.00 | 999 | 0.01 |

## Newest, 2031-01-01
| round | ledger random / pgbench | ledger hot / random | pipeline settled / pgbench | lag p99 (ms) | api accepted / pgbench |
|---|---|---|---|---|---|
| 1 | 4.25 | 1.10 | 2.00 | 150 | 0.20 (900/s) |
| 2 | 4.75 | 0.90 | 2.50 | 170 | 0.22 (950/s) |
"""  # noqa: E501


def test_the_figures_are_the_newest_table_of_the_docs() -> None:
    found = web.figures_from(MARKDOWN, "**3 of 45 runs failed, in 1,999 s**")
    assert found is not None
    assert found.source == "Newest, 2031-01-01"
    assert [row.values for row in found.rows] == [
        ("4.25", "4.75"), ("1.10", "0.90"), ("2.00", "2.50"), ("150", "170"),
        ("0.20 (900/s)", "0.22 (950/s)"),
    ]  # fmt: skip
    assert found.chaos == "3 of 45 runs failed, in 1,999 s"
    assert web.figures_from("# nothing measured\n", "") is None
    assert web.figures(Path("/nonexistent-kizo-docs")) is None


@pytest.mark.asyncio
async def test_the_landing_page_shows_what_docs_benchmarks_md_measured(client: Client) -> None:
    expected = web.figures_from((ROOT / "docs" / "benchmarks.md").read_text(),
                                (ROOT / "docs" / "chaos.md").read_text())  # fmt: skip
    assert expected is not None, "docs/benchmarks.md lost the table the landing page reads"
    html = await (await client.get("/")).get_data(as_text=True)
    for row in expected.rows:
        assert f"<td>{', '.join(row.values)}</td>" in html, row
    assert expected.chaos is not None and expected.chaos in html
    assert 'name="robots"' not in html  # the landing page is the one page to index


def test_bucket_quantiles_read_upper_bounds() -> None:
    buckets = {0.1: 50.0, 0.5: 90.0, 1.0: 99.0, math.inf: 100.0}
    assert console.quantile(buckets, 0.5) == 0.1
    assert console.quantile(buckets, 0.9) == 0.5
    assert console.quantile(buckets, 0.99) == 1.0
    assert console.quantile(buckets, 1.0) == math.inf
    assert console.quantile({}, 0.5) is None
    assert console.quantile({math.inf: 0.0}, 0.5) is None


def test_access_token_ttl_and_chaos_runs_dir_come_from_the_environment() -> None:
    config = Config.from_env({**TEST_SECRETS, "KIZO_ACCESS_TTL_S": "7",
                              "KIZO_CHAOS_RUNS_DIR": "/srv/runs"})  # fmt: skip
    assert (config.auth.access_ttl_s, config.chaos_runs_dir) == (7, Path("/srv/runs"))
    assert Config.from_env(TEST_SECRETS).auth.access_ttl_s == 900
    for bad in ("0", "x", "86401"):
        with pytest.raises(ConfigError, match="KIZO_ACCESS_TTL_S"):
            Config.from_env({**TEST_SECRETS, "KIZO_ACCESS_TTL_S": bad})


async def _admin_tokens(client: Client, db_url: str) -> dict[str, Any]:
    tokens = await signup(client, name="Op")
    conn = await asyncpg.connect(db_url)
    try:
        await conn.execute("UPDATE users SET role = 'admin' WHERE id = $1::uuid",
                           tokens["user"]["id"])  # fmt: skip
    finally:
        await conn.close()
    return tokens


@pytest.mark.asyncio
async def test_console_routes_are_for_admins_and_report_missing_sources(
    client: Client, db_url: str
) -> None:
    user = await signup(client)
    for path in ("overview", "faults", "chaos-runs"):
        answer = await client.get(f"/api/v1/admin/{path}", headers=bearer(user))
        assert answer.status_code == 403, path
        assert (await client.get(f"/api/v1/admin/{path}")).status_code == 401
    admin = bearer(await _admin_tokens(client, db_url))
    deposit = await client.post("/api/v1/payments/deposit", json={"amount": 5},
                                headers=bearer(user) | {"Idempotency-Key": "w-1"})  # fmt: skip
    assert deposit.status_code == 202

    overview = await (await client.get("/api/v1/admin/overview", headers=admin)).get_json()
    OverviewOut.model_validate(overview)
    assert overview["backlog"]["open"] == 1  # no worker here: the deposit stays pending
    assert overview["backlog"]["oldest_open_age_s"] >= 0
    assert overview["janitor"] == {"reachable": False, "error": "ConnectError"}
    assert overview["settlement_lag"]["reachable"] == 0
    assert overview["grafana_url"] is None  # not an http(s) URL: never a link
    assert overview["needs_attention"]["count"] == 0

    faults = await (await client.get("/api/v1/admin/faults", headers=admin)).get_json()
    FaultsOut.model_validate(faults)
    assert (faults["reachable"], faults["proxies"]) == (False, [])

    runs = await (await client.get("/api/v1/admin/chaos-runs", headers=admin)).get_json()
    ChaosRunsOut.model_validate(runs)
    [run] = runs["items"]  # the unreadable journal is left out
    assert run | {"finished_at": "-"} == {
        "run": "pg-crash-seed2", "scenario": "pg-crash", "seed": 2, "mutation": "row_locks_off",
        "verdict": "fail", "violations": 9, "lag_p99_ms": 6790.0, "convergence_s": None,
        "finished_at": "-"}  # fmt: skip


def test_chaos_runs_of_a_missing_directory_are_none(tmp_path: Path) -> None:
    assert console.chaos_runs(tmp_path / "absent") == []
