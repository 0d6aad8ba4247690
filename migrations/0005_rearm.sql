-- Re-arming intents flagged needs_attention (docs/pipeline.md): how often the janitor has given
-- one a fresh re-drive budget on its own, so that it stops after KIZO_REARM_MAX and leaves the
-- rest to an operator; and an index for the flagged few, read on every janitor pass.

ALTER TABLE transactions ADD COLUMN rearms integer NOT NULL DEFAULT 0;
CREATE INDEX transactions_needs_attention_idx ON transactions (created_at)
    WHERE needs_attention AND status = 'pending';
