-- Payments like production: reconciliation of orders whose notification never came, expiry of unpaid
-- orders, and what ops need to pay a manual refund out.

-- The reconcile and expiry scans claim an awaiting order by moving payment_next_check_at forward (in
-- the same statement that finds it, FOR UPDATE SKIP LOCKED), so two beats never check one order at
-- once, and the interval doubles with payment_checks so an order nobody pays is not polled every minute.
ALTER TABLE orders
    ADD COLUMN payment_checks        integer NOT NULL DEFAULT 0 CHECK (payment_checks >= 0),
    ADD COLUMN payment_next_check_at timestamptz;

-- Partial indexes: each scan reads only orders awaiting payment, whatever the size of the table.
CREATE INDEX orders_awaiting_unchecked ON orders (updated_at)
    WHERE status = 'awaiting_payment' AND payment_next_check_at IS NULL;
CREATE INDEX orders_awaiting_recheck ON orders (payment_next_check_at)
    WHERE status = 'awaiting_payment';
CREATE INDEX orders_awaiting_since ON orders (updated_at)
    WHERE status = 'awaiting_payment';
CREATE INDEX orders_refund_manual ON orders (updated_at)
    WHERE status = 'refund_manual';

-- A bank-transfer payment's virtual account, as the gateway reported it.
ALTER TABLE payments
    ADD COLUMN va_bank   text,
    ADD COLUMN va_number text;

-- The ledger report reads orders by when they were created.
CREATE INDEX orders_created_at ON orders (created_at);
