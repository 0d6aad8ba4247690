"""The CSV export opened as a spreadsheet reads it: no text cell a spreadsheet would run as a
formula (OWASP's CSV injection triggers = + - @ tab CR), the users' text intact after the quote
that neutralises it, and amounts still plain numbers."""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from hypothesis import given
from hypothesis import strategies as st
from quart.typing import TestClientProtocol as Client

from api._service import CSV_COLUMNS, FORMULA_TRIGGERS, spreadsheet_cell
from infra.config import RateLimitConfig
from tests._api_helpers import api_client, bearer, signup
from tests.conftest import ServerSet

NOTES = [
    "=SUM(A1:A9)",
    "+1+2",
    "-2+3",
    "@SUM(1,2)",
    "\t=1+1",
    "\r=1+1",
    "  =1+1",
    "\n-1",
    '=HYPERLINK("http://evil.test","x"),;"',
    "plain note",
    "'quoted already",
    "a=b",
]
EMAILS = ["=1+2@evil.test", "+1+2@evil.test", "-1+2@evil.test"]


@pytest_asyncio.fixture
async def client(servers: ServerSet, db_url: str, redis_client: object) -> AsyncIterator[Client]:
    async with api_client(servers, db_url, RateLimitConfig(enabled=False)) as client:
        yield client


def _spreadsheet_rows(text: str) -> list[list[str]]:
    """Each cell as a spreadsheet's CSV import sees it (quotes removed, "" unescaped)."""
    header, *rows = list(csv.reader(io.StringIO(text, newline="")))
    assert header == CSV_COLUMNS
    return rows


@pytest.mark.asyncio
async def test_formula_triggers_in_notes_and_emails_are_neutralised(client: Client) -> None:
    alice = await signup(client, EMAILS[0], name="=1+1")  # the name is in no export
    bob, carol = await signup(client, EMAILS[1]), await signup(client, EMAILS[2])
    sent: dict[str, tuple[str, str]] = {}  # note -> the recipient's email
    for n, note in enumerate(NOTES):
        to = (bob, carol)[n % 2]["user"]["email"]
        response = await client.post(
            "/api/v1/payments/transfer",
            json={"to": to, "amount": n + 1, "note": note},
            headers=bearer(alice) | {"Idempotency-Key": f"csv-{n}"},
        )
        assert response.status_code == 202, await response.get_data()
        sent[str(n + 1)] = (note, to)
    for tokens, who in ((alice, "sender"), (bob, "recipient")):
        export = await client.get("/api/v1/transactions/export.csv", headers=bearer(tokens))
        assert export.status_code == 200
        text = await export.get_data(as_text=True)
        rows = _spreadsheet_rows(text)
        assert rows, who
        for row in rows:
            cells = dict(zip(CSV_COLUMNS, row, strict=True))
            for column, cell in cells.items():
                assert not cell.lstrip().startswith(FORMULA_TRIGGERS), (who, column, cell)
                assert not cell.startswith(FORMULA_TRIGGERS), (who, column, cell)
            note, to = sent[cells["amount"]]
            counterparty = to if who == "sender" else alice["user"]["email"]
            assert cells["note"] == _neutral(note)
            assert cells["counterparty"] == _neutral(counterparty)
            assert cells["counterparty"].removeprefix("'") == counterparty  # survives
        # Amounts stay numbers a spreadsheet sums: unquoted, where every text cell is quoted.
        body = text.split("\r\n", 1)[1]  # past the header, whose names are unquoted
        numeric = list(csv.reader(io.StringIO(body, newline=""), quoting=csv.QUOTE_NONNUMERIC))
        assert len(numeric) == len(rows)
        for row in numeric:
            assert [type(cell) for cell in row] == [
                float if column == "amount" else str for column in CSV_COLUMNS
            ]


def _neutral(text: str) -> str:
    return "'" + text if text.lstrip().startswith(FORMULA_TRIGGERS) else text


@given(st.text() | st.integers())
def test_a_cell_never_starts_a_formula_and_keeps_its_text(value: str | int) -> None:
    cell = spreadsheet_cell(value)
    if isinstance(value, int):
        assert cell == value  # a number, written plain
        return
    assert isinstance(cell, str)
    assert not cell.lstrip().startswith(FORMULA_TRIGGERS)
    assert cell in (value, "'" + value)
