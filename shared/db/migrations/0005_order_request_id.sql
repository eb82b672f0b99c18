-- The request id of the create that made the order (X-Request-Id from the proxy, or ours). Work the
-- order causes later starts elsewhere: the gateway's notification is the gateway's own request, a sweep
-- is beat's. Those adopt this id once they know the order, so one grep of it shows the order's whole life
-- across web and workers. Bounded by the web edge (web/requestid.py): at most 128 safe characters.
--
-- A nullable column without a default is a catalogue change only; the CHECK is added NOT VALID, so the
-- ALTER never scans orders under its exclusive lock (every old row is NULL, which the check allows), and
-- the lock is given up after 3 s rather than queueing every create behind a long transaction.
SET LOCAL lock_timeout = '3s';
ALTER TABLE orders ADD COLUMN IF NOT EXISTS request_id text;
ALTER TABLE orders DROP CONSTRAINT IF EXISTS orders_request_id_length;
ALTER TABLE orders ADD CONSTRAINT orders_request_id_length
    CHECK (request_id IS NULL OR length(request_id) <= 128) NOT VALID;
