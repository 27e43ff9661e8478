-- The idempotency ledger: a row created under an idempotency key keeps a
-- digest of the request that created it, so a later request with the same
-- key is answered with the row only if it asks for the same thing (and is
-- refused otherwise). Keys are scoped by the hub to the endpoint and the
-- agent; the digest covers the scope and the request's body.
ALTER TABLE messages ADD COLUMN request_digest TEXT;
ALTER TABLE dispatch_intents ADD COLUMN request_digest TEXT;
