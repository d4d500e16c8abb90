-- Bearer tokens for the API (issue: authentication). Only the SHA-256 of each token's
-- secret part is kept: a copy of this table lets nobody in.
CREATE TABLE api_tokens (
    id           uuid PRIMARY KEY,
    name         text NOT NULL CHECK (char_length(name) BETWEEN 1 AND 100),
    scopes       text[] NOT NULL,
    secret_hash  bytea NOT NULL CHECK (octet_length(secret_hash) = 32),
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz,
    expires_at   timestamptz
);

-- The name of the token that submitted a job (NULL: submitted with authentication off,
-- or before tokens existed). A name, not a reference: revoking a token keeps its jobs.
ALTER TABLE jobs ADD COLUMN submitted_by text;
