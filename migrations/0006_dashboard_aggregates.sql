-- The dashboard's month totals, kept on the balance row by the ledger batch that settles the
-- money (one write it makes anyway), instead of summed over the month's transactions on every
-- GET /dashboard. month_start is the UTC calendar month the totals belong to; a reader treats
-- totals of an earlier month as zero, and the next settlement starts the new month from zero.
-- And partial indexes for the open transactions of an account (the dashboard's pending count):
-- few rows, whatever the length of the history.

ALTER TABLE balances
    ADD COLUMN month_start date,
    ADD COLUMN month_in_minor bigint NOT NULL DEFAULT 0,
    ADD COLUMN month_out_minor bigint NOT NULL DEFAULT 0;

UPDATE balances b SET
    month_start = date_trunc('month', now() AT TIME ZONE 'UTC')::date,
    month_in_minor = coalesce((SELECT sum(amount_minor) FROM transactions t
        WHERE t.dest_id = b.account_id AND t.status = 'settled'
        AND t.settled_at >= date_trunc('month', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'), 0),
    month_out_minor = coalesce((SELECT sum(amount_minor) FROM transactions t
        WHERE t.source_id = b.account_id AND t.status = 'settled'
        AND t.settled_at >= date_trunc('month', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'), 0);

CREATE INDEX transactions_open_source_idx ON transactions (source_id)
    WHERE status IN ('pending', 'processing');
CREATE INDEX transactions_open_dest_idx ON transactions (dest_id)
    WHERE status IN ('pending', 'processing');
