-- The request id of the create that made the order (X-Request-Id from the proxy, or ours). Work the
-- order causes later starts elsewhere: the gateway's notification is the gateway's own request, a sweep
-- is beat's. Those adopt this id once they know the order, so one grep of it shows the order's whole life
-- across web and workers. Bounded by the web edge (web/requestid.py): at most 128 safe characters.
ALTER TABLE orders ADD COLUMN IF NOT EXISTS request_id text
    CHECK (request_id IS NULL OR length(request_id) <= 128);
