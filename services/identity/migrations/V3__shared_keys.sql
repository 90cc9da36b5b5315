-- Signing keys shared by every identity replica. The private half is sealed
-- (ChaCha20-Poly1305) with the key-encryption key each replica reads from its
-- own file; the database never holds a usable private key. Index 0 is the
-- staged key, the highest index the primary, the rest secondaries.
CREATE TABLE signing_keys (
    idx        integer PRIMARY KEY CHECK (idx >= 0),
    public_key bytea NOT NULL UNIQUE,
    -- nonce (12 bytes) || ciphertext || tag; the public key is the AEAD's
    -- associated data, so a sealed secret only opens as its own row's key.
    sealed     bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
