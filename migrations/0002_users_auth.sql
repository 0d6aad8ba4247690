-- Users of the API and the key ring that signs their access tokens.
CREATE TABLE users (
    id             uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    email          text NOT NULL CHECK (length(email) BETWEEN 3 AND 254),
    name           text NOT NULL CHECK (length(name) BETWEEN 1 AND 100),
    password_hash  text NOT NULL,
    role           text NOT NULL DEFAULT 'user' CHECK (role IN ('user', 'admin')),
    account_id     uuid NOT NULL UNIQUE REFERENCES accounts (id),
    created_at     timestamptz NOT NULL DEFAULT now()
);
-- Emails are unique regardless of case.
CREATE UNIQUE INDEX users_email_idx ON users (lower(email));

-- HS256 signing keys; the newest signs, the newest two verify (kizo keys rotate).
CREATE TABLE signing_keys (
    kid         text PRIMARY KEY,
    secret      text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);
