-- The janitor's state: findings it reports, and its mirror of the bank statement.

CREATE TABLE reconciliation_findings (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind         text NOT NULL,
    subject      text NOT NULL,
    detail       text NOT NULL,
    found_at     timestamptz NOT NULL DEFAULT now(),
    resolved_at  timestamptz
);
-- A finding that keeps showing is one open row, not one per pass.
CREATE UNIQUE INDEX reconciliation_findings_open_idx
    ON reconciliation_findings (kind, subject) WHERE resolved_at IS NULL;

-- Succeeded payments read from the bank's statement, so each pass reads only new pages and the
-- reverse check (every settled deposit/withdrawal is on the statement) is one join.
CREATE TABLE bank_statement (
    key           text PRIMARY KEY,
    txn_id        uuid,
    kind          text NOT NULL,
    account       text NOT NULL,
    amount_minor  bigint NOT NULL,
    seen_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX bank_statement_txn_idx ON bank_statement (txn_id);

CREATE TABLE janitor_state (
    name   text PRIMARY KEY,
    value  text NOT NULL
);
