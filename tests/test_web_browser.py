"""The web pages in a real browser (Debian's Chromium driven by Playwright) against a whole
running system (API, workers, janitor, bank, fault proxy on their own servers): a user journey
from sign-up to settled history and CSV, a double click and a lost answer that pay once, a
message for each problem the API returns, the operations console, a session that outlives its
access token, and axe-core's accessibility check on every page at desktop and phone widths.

One system and one browser for the module (an xdist group keeps it on one worker); each test
opens fresh browser contexts. Screenshots land in test-artifacts/web/ (gitignored); docs/img
holds copies of the main ones.
"""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from axe_playwright_python.sync_playwright import Axe  # type: ignore[import-untyped]
from playwright.sync_api import Browser, BrowserContext, Page, Route, expect, sync_playwright

from infra.system import System, scratch_system

pytestmark = pytest.mark.xdist_group("browser")

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "web"
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}
ACCESS_TTL_S = 4  # short, so the refresh of every session in this module is exercised
SIGNIN_PER_EMAIL = 3  # per minute: the fourth wrong password meets the rate limit
SETTLE_TIMEOUT_MS = 20_000
PASSWORD = "correct horse battery"
GRAFANA = "http://127.0.0.1:3000"
SERIOUS = {"serious", "critical"}
PAGE_SIZE = 20  # the wallet's history page (api/web/static/js/dashboard.js)


def _journal(root: Path) -> None:
    """A chaos run's journal, shaped as `kizo chaos run` writes it, for the console to list."""
    run = root / "bank-flaky-seed7"
    run.mkdir(parents=True)
    journal = {"scenario": "bank-flaky", "seed": 7, "mutation": None, "violations": 0,
               "checker": {"verdict": "pass", "violations": 0},
               "figures": {"lag_ms": {"p50": 40.0, "p99": 4299.0}},
               "convergence": {"seconds": 2.35}}  # fmt: skip
    (run / "journal.json").write_text(json.dumps(journal))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    runs = tmp_path_factory.mktemp("chaos-runs")
    _journal(runs)
    overrides = {
        "KIZO_ACCESS_TTL_S": str(ACCESS_TTL_S),
        "KIZO_RATE_SIGNIN_PER_EMAIL": str(SIGNIN_PER_EMAIL),
        "KIZO_RATE_SIGNUP_PER_IP": "1000",
        "KIZO_JANITOR_INTERVAL_S": "1",
        "KIZO_RECONCILE_GRACE_S": "1",
        "KIZO_CHAOS_RUNS_DIR": str(runs),
        "KIZO_GRAFANA_URL": GRAFANA,
    }
    with scratch_system(overrides) as system:
        yield system


@pytest.fixture(scope="module")
def browser(stack: System) -> Iterator[Browser]:
    """After the stack: Playwright's sync API runs an event loop of its own in this thread, and
    the stack's start needs asyncio.run."""
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: the browser tests drive Debian's Chromium (`make test`"
            " installs it when run as root; or: apt-get install chromium)"
        )
    with sync_playwright() as playwright:
        # --no-sandbox: Chromium refuses to sandbox itself as root, which CI machines are.
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield browser
        browser.close()


class Tab:
    """A page in a context of its own (its own sessionStorage), that fails the test on any
    script error."""

    def __init__(self, browser: Browser, base: str, viewport: dict[str, int]) -> None:
        size: Any = viewport  # Playwright's ViewportSize is a TypedDict of these two keys
        self.context: BrowserContext = browser.new_context(
            base_url=base, viewport=size, accept_downloads=True
        )
        self.page: Page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)

    def close(self, allowed: str | None = None) -> None:
        """``allowed``: a pattern of console errors the test provoked (Chromium logs every
        4xx answer of a fetch as an error)."""
        self.context.close()
        unexpected = [e for e in self.errors if allowed is None or not re.search(allowed, e)]
        assert not unexpected, unexpected


@pytest.fixture
def tabs(browser: Browser, stack: System) -> Iterator[list[Tab]]:
    opened: list[Tab] = []
    yield opened
    for tab in opened:
        tab.context.close()


def _tab(tabs: list[Tab], browser: Browser, stack: System, viewport: dict[str, int] = DESKTOP,
         ) -> Tab:  # fmt: skip
    tab = Tab(browser, stack.api_url, viewport)
    tabs.append(tab)
    return tab


def _email(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}@example.test"


def _shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def _axe(page: Page, what: str) -> None:
    results = Axe().run(page)
    bad = [(v["id"], v["impact"], [n["target"] for n in v["nodes"]][:3])
           for v in results.response["violations"] if v["impact"] in SERIOUS]  # fmt: skip
    assert not bad, f"{what}: {bad}"


def sign_up(page: Page, name: str, email: str) -> None:
    page.goto("/app")
    page.get_by_label("Name").fill(name)
    form = page.locator("#signup-form")
    form.get_by_label("Email").fill(email)
    form.get_by_label("Password").fill(PASSWORD)
    form.get_by_role("button", name="Create wallet").click()
    expect(page.get_by_role("heading", name="Wallet", exact=True)).to_be_visible()


def pay(page: Page, form_id: str, amount: str, to: str | None = None) -> None:
    form = page.locator(form_id)
    if to is not None:
        form.get_by_label("Recipient's email").fill(to)
    form.get_by_label(re.compile("^Amount")).fill(amount)
    form.locator("button[type=submit]").click()


def first_row(page: Page) -> Any:
    return page.locator("#history-rows tr").first


def settled(page: Page, count: int) -> None:
    """``count`` rows, every one settled (the page polls; nothing reloads it)."""
    rows = page.locator("#history-rows tr")
    expect(rows).to_have_count(count, timeout=SETTLE_TIMEOUT_MS)
    expect(page.locator('#history-rows tr[data-status="settled"]')).to_have_count(
        count, timeout=SETTLE_TIMEOUT_MS
    )


def test_journey_two_users_deposit_transfer_settle_and_export(
    browser: Browser, stack: System, tabs: list[Tab]
) -> None:
    alice, bob = _tab(tabs, browser, stack), _tab(tabs, browser, stack, PHONE)
    alice_email, bob_email = _email("alice"), _email("bob")
    sign_up(alice.page, "Alice", alice_email)
    sign_up(bob.page, "Bob", bob_email)
    pay(alice.page, "#deposit-form", "100.00")
    settled(alice.page, 1)
    expect(alice.page.locator("#bal-available")).to_have_text("100.00 USD")
    pay(alice.page, "#transfer-form", "30.25", to=bob_email)
    settled(alice.page, 2)
    expect(alice.page.locator("#transfer-form .msg")).to_contain_text("settled")
    expect(alice.page.locator("#bal-available")).to_have_text("69.75 USD")
    # Bob's page was open all along: the transfer appears and settles there by itself.
    settled(bob.page, 1)
    expect(first_row(bob.page)).to_contain_text(alice_email)
    expect(bob.page.locator("#bal-available")).to_have_text("30.25 USD")
    pay(alice.page, "#withdraw-form", "9.75")
    settled(alice.page, 3)
    expect(alice.page.locator("#bal-available")).to_have_text("60.00 USD")
    expect(alice.page.locator("#bal-pending")).to_have_text("0.00 USD")
    _shot(alice.page, "dashboard-desktop")
    _shot(bob.page, "dashboard-phone")
    _axe(alice.page, "dashboard, desktop")
    _axe(bob.page, "dashboard, phone")

    # By keyboard: the transfer's detail opens with Enter, closes with Escape, and the focus
    # goes back to where it was.
    keyboard = alice.page.keyboard
    details = alice.page.locator("#history-rows tr").nth(1).get_by_role("button")
    details.focus()
    keyboard.press("Enter")
    dialog = alice.page.get_by_role("dialog")
    expect(dialog).to_contain_text(bob_email)
    expect(dialog).to_contain_text("Settled")
    _axe(alice.page, "transaction detail")
    keyboard.press("Escape")
    expect(dialog).to_be_hidden()
    expect(alice.page.locator("#history-rows tr").nth(1).get_by_role("button")).to_be_focused()

    with alice.page.expect_download() as download:
        alice.page.get_by_role("button", name="Export CSV").click()
    rows = list(csv.DictReader(io.StringIO(Path(download.value.path()).read_text())))
    assert len(rows) == 3
    assert {r["status"] for r in rows} == {"settled"}
    assert sorted(int(r["amount"]) for r in rows) == [975, 3025, 10000]
    alice.close()
    bob.close()


def test_a_double_click_and_a_lost_answer_each_pay_once(
    browser: Browser, stack: System, tabs: list[Tab]
) -> None:
    tab = _tab(tabs, browser, stack)
    page = tab.page
    sign_up(page, "Carol", _email("carol"))
    sent: list[str | None] = []
    page.on("request", lambda r: sent.append(r.headers.get("idempotency-key"))
            if r.url.endswith("/payments/deposit") else None)  # fmt: skip
    page.locator("#deposit-form").get_by_label(re.compile("^Amount")).fill("5")
    page.locator("#deposit-form button[type=submit]").dblclick()
    settled(page, 1)
    page.wait_for_timeout(500)  # a poll after the one that showed it settled
    expect(page.locator("#history-rows tr")).to_have_count(1)
    assert len(sent) == 1 and sent[0], sent  # the second click sent nothing

    # The answer to the next deposit is lost after the API recorded it: the page says so, and
    # pressing again resends the same key, which the API replays instead of paying again.
    keys: list[str] = []

    def lose_answer(route: Route) -> None:
        keys.append(route.request.headers["idempotency-key"])
        route.fetch()  # the API gets the request and records the payment
        route.abort("connectionreset")

    page.route("**/api/v1/payments/deposit", lose_answer, times=3)
    pay(page, "#deposit-form", "7")
    msg = page.locator("#deposit-form .msg")
    expect(msg).to_contain_text("it resends the same payment key", timeout=10_000)
    page.unroute("**/api/v1/payments/deposit")
    page.locator("#deposit-form button[type=submit]").click()
    expect(msg).to_contain_text("Already accepted earlier")
    settled(page, 2)
    expect(page.locator("#bal-available")).to_have_text("12.00 USD")
    assert len(set(keys)) == 1 and len(keys) == 3  # the automatic retries reused the key
    tab.close(allowed="Failed to load resource|ERR_CONNECTION_RESET")


def test_each_problem_the_api_returns_has_a_clear_message(
    browser: Browser, stack: System, tabs: list[Tab]
) -> None:
    tab = _tab(tabs, browser, stack)
    page = tab.page
    taken = _email("dave")
    sign_up(page, "Dave", taken)
    page.get_by_role("button", name="Sign out").click()

    signup = page.locator("#signup-form")
    signup.get_by_label("Name").fill("Again")
    signup.get_by_label("Email").fill(taken)
    signup.get_by_label("Password").fill(PASSWORD)
    signup.get_by_role("button", name="Create wallet").click()
    expect(page.locator("#signup-msg")).to_have_text(
        "A wallet with this email already exists. Sign in instead."
    )
    # An address the browser accepts and the API refuses: the field carries the message.
    signup.get_by_label("Email").fill("x@localhost")
    signup.get_by_role("button", name="Create wallet").click()
    expect(page.locator("#signup-msg")).to_have_text("Please correct the highlighted fields.")
    expect(signup.get_by_label("Email")).to_have_attribute("aria-invalid", "true")

    signin = page.locator("#signin-form")
    for _ in range(SIGNIN_PER_EMAIL):
        signin.get_by_label("Email").fill(taken)
        signin.get_by_label("Password").fill("wrong password!")
        signin.get_by_role("button", name="Sign in").click()
        expect(page.locator("#signin-msg")).to_have_text("Wrong email or password.")
    signin.get_by_label("Password").fill("wrong password!")
    signin.get_by_role("button", name="Sign in").click()
    expect(page.locator("#signin-msg")).to_have_text(
        re.compile(r"^Too many requests\. Please wait \d+ seconds, then try again\.$")
    )
    _axe(page, "sign-in with errors")

    sign_up(page, "Eve", _email("eve"))
    pay(page, "#transfer-form", "1.00", to=_email("nobody"))
    transfer_msg = page.locator("#transfer-form .msg")
    expect(transfer_msg).to_have_text("No Kizo user has that email. Check the recipient's address.")
    pay(page, "#transfer-form", "1.00", to=taken)  # Eve has nothing yet
    expect(transfer_msg).to_contain_text("failed, not enough available funds",
                                         timeout=SETTLE_TIMEOUT_MS)  # fmt: skip
    expect(first_row(page)).to_have_attribute("data-status", "failed")
    expect(first_row(page)).to_contain_text("Failed: not enough available funds")
    pay(page, "#withdraw-form", "abc")
    expect(page.locator("#withdraw-form .field-error")).to_contain_text("greater than zero")
    _shot(page, "dashboard-problems-desktop")
    _axe(page, "wallet with errors")
    tab.close(allowed="Failed to load resource")


def _admin(stack: System) -> str:
    email = _email("admin")
    subprocess.run([sys.executable, "-m", "kizo.cli", "admin", "create", email,
                    "--password-stdin"], input=PASSWORD.encode(), env=stack.env,
                   check=True, capture_output=True, timeout=60)  # fmt: skip
    return email


def test_the_operations_console(browser: Browser, stack: System, tabs: list[Tab]) -> None:
    # A fault the console must show: a proxy with a latency toxic on the fault proxy.
    proxy = {"name": "web_test", "listen": "127.0.0.1:0", "upstream": "127.0.0.1:9"}
    httpx.post(f"{stack.proxy_url}/proxies", json=proxy, timeout=5).raise_for_status()
    toxic = {"name": "slow_db", "type": "latency", "attributes": {"latency": 250}}
    httpx.post(f"{stack.proxy_url}/proxies/web_test/toxics", json=toxic,
               timeout=5).raise_for_status()  # fmt: skip
    # A finding the janitor makes itself: a payment on the bank's statement that Kizo never made.
    stray = f"web-stray-{uuid.uuid4().hex[:8]}"
    account = str(uuid.uuid4())
    httpx.put(f"{stack.bank_url}/admin/accounts/{account}", json={"balance_minor": 10_000},
              timeout=5).raise_for_status()  # fmt: skip
    httpx.post(f"{stack.bank_url}/collections", headers={"Idempotency-Key": stray},
               json={"account": account, "amount_minor": 4_200, "currency": "USD"},
               timeout=5).raise_for_status()  # fmt: skip
    email = _admin(stack)

    user = _tab(tabs, browser, stack)
    sign_up(user.page, "Frank", _email("frank"))
    user.page.goto("/app/console")
    expect(user.page.locator("#notice")).to_contain_text("is for administrators")
    user.close(allowed="Failed to load resource")

    for viewport, name in ((DESKTOP, "desktop"), (PHONE, "phone")):
        tab = _tab(tabs, browser, stack, viewport)
        page = tab.page
        page.goto("/app/console")
        page.locator("#signin-form").get_by_label("Email").fill(email)
        page.locator("#signin-form").get_by_label("Password").fill(PASSWORD)
        page.get_by_role("button", name="Sign in").click()
        expect(page.get_by_role("heading", name="Operations console")).to_be_visible()
        expect(page.locator("#janitor")).to_contain_text(re.compile(r"clean \d+"), timeout=10_000)
        expect(page.locator("#backlog")).to_contain_text("Open intents")
        expect(page.locator("#lag")).to_contain_text("Oldest open intent")
        expect(page.locator("#faults-table")).to_contain_text("slow_db (latency")
        expect(page.locator("#faults-summary")).to_contain_text("1 active fault")
        findings = page.locator("#findings-table")
        expect(findings).to_contain_text(stray, timeout=10_000)
        expect(findings).to_contain_text("bank collection 4200 has no Kizo transaction")
        expect(page.locator("#chaos-table")).to_contain_text("bank-flaky")
        expect(page.locator("#chaos-table")).to_contain_text("4299 ms")
        expect(page.get_by_role("link", name="Overview dashboard")).to_have_attribute(
            "href", f"{GRAFANA}/d/kizo-overview"
        )
        _shot(page, f"console-{name}")
        _axe(page, f"console, {name}")
        tab.close()


def test_a_session_outlives_its_access_token(
    browser: Browser, stack: System, tabs: list[Tab]
) -> None:
    tab = _tab(tabs, browser, stack)
    page = tab.page
    sign_up(page, "Grace", _email("grace"))
    refreshes: list[int] = []
    page.on("response", lambda r: refreshes.append(r.status) if r.url.endswith("/auth/refresh")
            else None)  # fmt: skip
    page.wait_for_timeout((ACCESS_TTL_S + 1) * 1000)
    pay(page, "#deposit-form", "3")
    settled(page, 1)
    assert refreshes and set(refreshes) == {200}
    page.reload()  # the access token was only in memory; the refresh token brings it back
    expect(page.get_by_role("heading", name="Wallet", exact=True)).to_be_visible()
    expect(page.locator("#bal-available")).to_have_text("3.00 USD")
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("heading", name="Your Kizo wallet")).to_be_visible()
    page.reload()
    expect(page.get_by_role("heading", name="Your Kizo wallet")).to_be_visible()
    tab.close()


def test_history_pages_back_with_load_older(
    browser: Browser, stack: System, tabs: list[Tab]
) -> None:
    email = _email("heidi")
    with httpx.Client(base_url=stack.api_url, timeout=10) as api:
        body = {"email": email, "password": PASSWORD, "name": "Heidi"}
        created = api.post("/api/v1/auth/signup", json=body)
        assert created.status_code == 201, created.text
        auth = {"Authorization": f"Bearer {created.json()['access_token']}"}
        for i in range(PAGE_SIZE + 1):
            paid = api.post("/api/v1/payments/deposit", json={"amount": 100 + i},
                            headers=auth | {"Idempotency-Key": f"page-{i}"})  # fmt: skip
            assert paid.status_code == 202, paid.text
    tab = _tab(tabs, browser, stack, PHONE)
    page = tab.page
    page.goto("/app")
    signin = page.locator("#signin-form")
    signin.get_by_label("Email").fill(email)
    signin.get_by_label("Password").fill(PASSWORD)
    signin.get_by_role("button", name="Sign in").click()
    rows = page.locator("#history-rows tr")
    expect(rows).to_have_count(PAGE_SIZE)
    expect(first_row(page)).to_contain_text("+1.20 USD")  # the newest, 100 + PAGE_SIZE cents
    page.get_by_role("button", name="Load older").click()
    expect(rows).to_have_count(PAGE_SIZE + 1)
    expect(rows.last).to_contain_text("+1.00 USD")
    expect(page.get_by_role("button", name="Load older")).to_be_hidden()
    tab.close()


def test_landing_page_figures_meta_and_accessibility(
    browser: Browser, stack: System, tabs: list[Tab]
) -> None:
    docs = (Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md").read_text()
    for viewport, name in ((DESKTOP, "desktop"), (PHONE, "phone")):
        tab = _tab(tabs, browser, stack, viewport)
        page = tab.page
        started = time.monotonic()
        page.goto("/")
        assert time.monotonic() - started < 5
        expect(page).to_have_title(re.compile("Kizo"))
        page.keyboard.press("Tab")  # the skip link comes first, and leads to the content
        expect(page.get_by_role("link", name="Skip to content")).to_be_focused()
        page.keyboard.press("Enter")
        expect(page.locator("main")).to_be_focused()
        description = page.locator('meta[name="description"]').get_attribute("content")
        assert description and len(description) > 50
        assert page.locator('meta[name="viewport"]').count() == 1
        for cell in page.locator("#figures tbody td").all_text_contents()[:5]:
            for value in cell.split(", "):
                assert value in docs  # every figure shown is one the docs measured
        _shot(page, f"landing-{name}")
        _axe(page, f"landing, {name}")
        page.goto("/app")
        expect(page.get_by_role("heading", name="Your Kizo wallet")).to_be_visible()
        _shot(page, f"signin-{name}")
        _axe(page, f"sign-in, {name}")
        tab.close()
