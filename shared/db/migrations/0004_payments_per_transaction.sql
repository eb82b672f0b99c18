-- Money per gateway transaction, not per order. A buyer can end up paying one order twice (two
-- transactions captured): each capture must then have its own outcome (the order's capture becomes the
-- stamp or the order's refund; any other capture is refunded on its own), its own refund with its own
-- idempotency key, and its own ledger rows. And every transaction we opened is watched at the gateway
-- until the gateway says it is final, and for a while after, so a capture whose notification was lost
-- (a bank transfer settling after the order expired) is still found, booked and refunded.

-- Which capture is the order's own: 'order' (it pays for the stamp, or is the order's refund) or
-- 'extra' (any further capture of the same order; refunded by itself). Set together with captured_at.
ALTER TABLE payments
    ADD COLUMN capture_role text CHECK (capture_role IN ('order', 'extra')),
    -- The watch: the next status query is due at next_poll_at (NULL: no longer watched); polls counts
    -- them, so the interval doubles; final_at is when the gateway first reported a final status.
    ADD COLUMN polls        integer NOT NULL DEFAULT 0 CHECK (polls >= 0),
    ADD COLUMN next_poll_at timestamptz,
    ADD COLUMN final_at     timestamptz;
UPDATE payments SET capture_role = 'order' WHERE captured_at IS NOT NULL;
ALTER TABLE payments ADD CONSTRAINT payments_captured_with_a_role
    CHECK ((captured_at IS NULL) = (capture_role IS NULL));
DROP INDEX payments_one_capture_per_order;
CREATE UNIQUE INDEX payments_one_order_capture ON payments (order_id) WHERE capture_role = 'order';
CREATE INDEX payments_poll_due ON payments (next_poll_at) WHERE next_poll_at IS NOT NULL;
-- Watch what may still change: transactions the gateway never called final, recent ones, and any the
-- gateway reported paid that were never booked (whatever their age: the old code only logged a second
-- capture of an order), so each gets its outcome.
UPDATE payments SET next_poll_at = now()
WHERE gateway_status IS NULL OR gateway_status IN ('pending', 'authorize', 'capture')
   OR updated_at > now() - interval '2 days'
   OR (captured_at IS NULL AND gateway_status IN ('settlement', 'capture'));

-- One refund per gateway transaction (the key of a refund is its transaction now, not its order).
ALTER TABLE refunds DROP CONSTRAINT refunds_pkey;
ALTER TABLE refunds ADD PRIMARY KEY (gateway_order_id);
CREATE INDEX refunds_by_order ON refunds (order_id);
CREATE INDEX refunds_pending ON refunds (requested_at) WHERE status = 'pending';
CREATE INDEX refunds_manual ON refunds (requested_at) WHERE status = 'manual';
-- Since when a refund waits for finance (the order's event said so before; an extra capture's refund
-- has no order event).
ALTER TABLE refunds ADD COLUMN manual_since timestamptz;
UPDATE refunds r SET manual_since = coalesce(
    (SELECT max(e.at) FROM order_events e WHERE e.order_id = r.order_id AND e.to_status = 'refund_manual'),
    r.requested_at)
WHERE r.status = 'manual';

-- Every ledger row names its transaction: one capture, one refund, one revenue per transaction, and
-- at most one revenue per order. Rows booked before this migration get their order's one capture.
ALTER TABLE ledger_entries ADD COLUMN gateway_order_id text REFERENCES payments (gateway_order_id);
UPDATE ledger_entries l SET gateway_order_id = p.gateway_order_id
FROM payments p WHERE p.order_id = l.order_id AND p.capture_role = 'order';
ALTER TABLE ledger_entries DROP CONSTRAINT ledger_entries_order_id_kind_key;
-- NOT VALID: enforced for every new row; an old row without a capture (which the ledger report already
-- flags) doesn't block the upgrade.
ALTER TABLE ledger_entries ADD CONSTRAINT ledger_entries_name_their_transaction
    CHECK (gateway_order_id IS NOT NULL) NOT VALID;
CREATE UNIQUE INDEX ledger_one_kind_per_transaction ON ledger_entries (gateway_order_id, kind);
CREATE UNIQUE INDEX ledger_one_revenue_per_order ON ledger_entries (order_id) WHERE kind = 'revenue';
CREATE INDEX ledger_by_order ON ledger_entries (order_id);

-- The order-level reconcile scan is replaced by the per-transaction watch (the expiry scan reads
-- orders_awaiting_since, the checkout deadline orders_unpaid).
DROP INDEX orders_awaiting_unchecked;
DROP INDEX orders_awaiting_recheck;
