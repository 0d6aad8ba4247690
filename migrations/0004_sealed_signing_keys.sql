-- JWT signing secrets are sealed (AES-256-GCM: 12-byte nonce, then ciphertext and tag, with the
-- kid as associated data) with KIZO_KEYRING_KEY, which never enters the database, so a copy of
-- the database alone can neither read them nor mint access tokens.
-- Keys that earlier builds stored in plaintext are retired, not sealed: anyone with an old backup
-- already has them. Access tokens they signed (15 minutes at most) stop verifying and clients
-- refresh (refresh tokens are not JWTs); the API makes a new sealed key when it starts.
DELETE FROM signing_keys;
ALTER TABLE signing_keys DROP COLUMN secret;
ALTER TABLE signing_keys ADD COLUMN sealed bytea NOT NULL CHECK (length(sealed) > 28);
