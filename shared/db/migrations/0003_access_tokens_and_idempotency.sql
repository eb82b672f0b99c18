-- Access tokens are random, one per answer that hands one out, and only their SHA-256 hashes are kept:
-- a token can no longer be computed from the order id by anyone who knows (or guesses) a server secret.
-- A replayed create (same Idempotency-Key, same request) gets a fresh token for the same order, so an
-- order has a few hashes; the application keeps the newest ones.
ALTER TABLE orders ADD COLUMN access_token_hashes text[];
-- The old tokens were HMAC(SECRET_KEY, 'order-access:' || id). Those made under the development key (the
-- old code only warned about it) can be computed by anyone: they are dropped here. Such an order keeps
-- an unusable hash; its buyer gets a new token by repeating their create (same key, same request).
CREATE EXTENSION IF NOT EXISTS pgcrypto;
UPDATE orders SET access_token_hashes = CASE
    WHEN access_token_hash = encode(sha256(convert_to(rtrim(translate(encode(
             hmac('order-access:' || id::text, 'meterai-dev-secret-change-me', 'sha256'), 'base64'),
             '+/', '-_'), '='), 'UTF8')), 'hex')
    THEN ARRAY['revoked:' || gen_random_uuid()::text]
    ELSE ARRAY[access_token_hash] END;
ALTER TABLE orders
    ALTER COLUMN access_token_hashes SET NOT NULL,
    ADD CONSTRAINT orders_access_tokens_present CHECK (cardinality(access_token_hashes) BETWEEN 1 AND 8),
    DROP COLUMN access_token_hash;

-- Idempotency keys are scoped to the buyer's e-mail address: a stranger who guesses or sees someone's key
-- can't squat it (their create under that key is simply another buyer's order).
ALTER TABLE orders DROP CONSTRAINT orders_idempotency_key_key;
CREATE UNIQUE INDEX orders_idempotency_per_buyer ON orders (lower(email), idempotency_key);

-- Distinct notifications are bounded per gateway order (shared/services/notifications.py counts them).
CREATE INDEX notifications_by_gateway_order ON payment_notifications (gateway_order_id);
