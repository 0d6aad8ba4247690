-- The janitor compares every field of a statement line with the ledger; the currency was the one
-- its mirror did not keep. Lines mirrored before this migration have none and are not compared.
ALTER TABLE bank_statement ADD COLUMN currency char(3);
