-- The statement must never skip a payment. A sequence number is taken at INSERT but becomes
-- visible at COMMIT, so a reader paging by seq alone could pass a number whose transaction has
-- not committed yet and never see it. Each row therefore records its transaction id; the
-- statement only serves rows of transactions older than every transaction still running
-- (pg_snapshot_xmin), ordered by (xid, seq): that prefix can no longer grow in the middle.
ALTER TABLE payments ADD COLUMN xid xid8 NOT NULL DEFAULT pg_current_xact_id();

CREATE INDEX payments_statement ON payments (xid, seq) WHERE status = 'succeeded';
