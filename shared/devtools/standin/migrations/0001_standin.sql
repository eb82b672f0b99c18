-- The stand-in gateway's own tables, in its own schema (the runner sets search_path to it). This is
-- the gateway's data, not meterai's: nothing in meterai reads or joins these tables.

-- One row per Snap transaction, as the gateway knows it.
CREATE TABLE transactions (
    order_id           text PRIMARY KEY,
    gross_amount       bigint NOT NULL CHECK (gross_amount > 0),
    email              text,
    item_name          text,
    token              text NOT NULL UNIQUE,
    transaction_id     text NOT NULL UNIQUE,
    transaction_time   text NOT NULL,
    transaction_status text NOT NULL CHECK (transaction_status IN (
                           'pending', 'settlement', 'capture', 'expire', 'cancel', 'deny',
                           'refund', 'partial_refund')),
    payment_type       text,
    fraud_status       text,
    settlement_time    text,
    va_bank            text,
    va_number          text,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now()
);

-- Refunds, idempotent by refund_key: the primary key is what makes a repeated key a no-op.
CREATE TABLE refunds (
    order_id   text NOT NULL REFERENCES transactions (order_id),
    refund_key text NOT NULL,
    seq        integer NOT NULL,
    amount     bigint NOT NULL CHECK (amount > 0),
    reason     text NOT NULL,
    created_at text NOT NULL,
    response   jsonb NOT NULL,
    PRIMARY KEY (order_id, refund_key),
    UNIQUE (order_id, seq)
);

-- Every notification copy the gateway decided to send, and what became of it. delivered is NULL while
-- delivery is still being tried, so a restarted stand-in resumes those.
CREATE TABLE notifications (
    id               bigserial PRIMARY KEY,
    order_id         text NOT NULL REFERENCES transactions (order_id),
    copy             integer NOT NULL,
    body             jsonb NOT NULL,
    dropped          boolean NOT NULL DEFAULT false,
    attempts         integer NOT NULL DEFAULT 0,
    delivered        boolean,
    last_http_status integer,
    last_error       text,
    created_at       timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX notifications_by_order ON notifications (order_id, id);
CREATE INDEX notifications_in_flight ON notifications (id) WHERE delivered IS NULL AND NOT dropped;
