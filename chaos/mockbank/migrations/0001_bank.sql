-- The mock bank's own store: customer accounts and the payments it made with Kizo.
CREATE TABLE customer_accounts (
    account        text PRIMARY KEY CHECK (length(account) BETWEEN 1 AND 128),
    balance_minor  bigint NOT NULL CHECK (balance_minor >= 0)
);

-- One row per idempotency key (= Kizo transaction id); seq orders the statement.
CREATE TABLE payments (
    seq             bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
    key             text PRIMARY KEY CHECK (length(key) BETWEEN 1 AND 255),
    kind            text NOT NULL CHECK (kind IN ('collection', 'payout')),
    account         text NOT NULL,
    amount_minor    bigint NOT NULL CHECK (amount_minor > 0),
    currency        char(3) NOT NULL,
    status          text NOT NULL CHECK (status IN ('succeeded', 'failed')),
    failure_reason  text,
    created_at      timestamptz NOT NULL DEFAULT clock_timestamp()
);
