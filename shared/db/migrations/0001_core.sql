-- The core tables. The database enforces what it can: allowed statuses, integer rupiah, one live
-- serial per order, one idempotency key per order, one money movement of each kind per order.

CREATE TABLE orders (
    id                   uuid PRIMARY KEY,
    idempotency_key      text NOT NULL UNIQUE CHECK (length(idempotency_key) BETWEEN 1 AND 64),
    request_fingerprint  text NOT NULL,
    access_token_hash    text NOT NULL,
    email                text NOT NULL CHECK (length(email) BETWEEN 3 AND 254),
    status               text NOT NULL CHECK (status IN (
                             'created', 'awaiting_payment', 'paid', 'stamping', 'stamped',
                             'refund_pending', 'refund_manual', 'refunded', 'expired', 'rejected')),
    amount_idr           bigint NOT NULL CHECK (amount_idr > 0),
    page                 integer NOT NULL CHECK (page >= 1),
    x                    double precision NOT NULL CHECK (x >= 0),
    y                    double precision NOT NULL CHECK (y >= 0),
    document_key         text NOT NULL,
    document_sha256      text NOT NULL CHECK (document_sha256 ~ '^[0-9a-f]{64}$'),
    document_bytes       integer NOT NULL CHECK (document_bytes > 0),
    stamped_document_key text,
    stamped_sha256       text,
    serial               text,
    lease_owner          text,
    lease_expires_at     timestamptz,
    stamp_attempts       integer NOT NULL DEFAULT 0,
    reason_code          text,
    reason_message       text,
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now(),
    paid_at              timestamptz,
    refund_due_at        timestamptz,
    stamped_at           timestamptz,
    CHECK (status NOT IN ('paid', 'stamping') OR refund_due_at IS NOT NULL),
    CHECK (status <> 'stamped' OR (serial IS NOT NULL AND stamped_document_key IS NOT NULL))
);

-- Partial indexes: the sweeps and the redrive read only rows that have work, so their cost follows
-- the work they find, not the millions of settled orders beside it.
CREATE INDEX orders_stamp_open ON orders (refund_due_at) WHERE status IN ('paid', 'stamping');
CREATE INDEX orders_refund_open ON orders (updated_at) WHERE status = 'refund_pending';
CREATE INDEX orders_unpaid ON orders (created_at) WHERE status IN ('created', 'awaiting_payment');

CREATE TABLE order_events (
    id          bigserial PRIMARY KEY,
    order_id    uuid NOT NULL REFERENCES orders (id),
    from_status text,
    to_status   text NOT NULL,
    reason      text,
    detail      jsonb,
    at          timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX order_events_by_order ON order_events (order_id, id);

-- A serial is reserved at claim time, used by exactly one stamped document, voided on refund, and
-- never re-issued (the primary key keeps a voided serial out of circulation for good).
CREATE TABLE serials (
    serial          text PRIMARY KEY CHECK (serial ~ '^[0-9A-Z]{22}$'),
    order_id        uuid NOT NULL REFERENCES orders (id),
    status          text NOT NULL CHECK (status IN ('reserved', 'used', 'voided')),
    reserved_at     timestamptz NOT NULL DEFAULT now(),
    used_at         timestamptz,
    voided_at       timestamptz,
    document_sha256 text
);
CREATE UNIQUE INDEX serials_one_live_per_order ON serials (order_id) WHERE status <> 'voided';

-- One row per gateway transaction we opened for an order (a retried checkout may open a second).
CREATE TABLE payments (
    gateway_order_id text PRIMARY KEY,
    order_id         uuid NOT NULL REFERENCES orders (id),
    amount_idr       bigint NOT NULL CHECK (amount_idr > 0),
    token            text,
    redirect_url     text,
    gateway_status   text,
    payment_type     text,
    transaction_id   text,
    captured_at      timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX payments_by_order ON payments (order_id);
CREATE UNIQUE INDEX payments_one_capture_per_order ON payments (order_id) WHERE captured_at IS NOT NULL;

-- Raw, verified gateway notifications. The fingerprint makes an exact duplicate a no-op at insert.
CREATE TABLE payment_notifications (
    id                 bigserial PRIMARY KEY,
    gateway_order_id   text NOT NULL,
    transaction_status text NOT NULL,
    status_code        text,
    transaction_id     text,
    fingerprint        text NOT NULL UNIQUE,
    body               jsonb NOT NULL,
    received_at        timestamptz NOT NULL DEFAULT now(),
    processed_at       timestamptz,
    outcome            text
);
CREATE INDEX notifications_unprocessed ON payment_notifications (received_at) WHERE processed_at IS NULL;

CREATE TABLE refunds (
    order_id          uuid PRIMARY KEY REFERENCES orders (id),
    gateway_order_id  text NOT NULL REFERENCES payments (gateway_order_id),
    refund_key        text NOT NULL UNIQUE,
    amount_idr        bigint NOT NULL CHECK (amount_idr > 0),
    status            text NOT NULL CHECK (status IN ('pending', 'succeeded', 'manual')),
    reason            text NOT NULL,
    attempts          integer NOT NULL DEFAULT 0,
    last_error        text,
    gateway_response  jsonb,
    requested_at      timestamptz NOT NULL DEFAULT now(),
    completed_at      timestamptz,
    manual_reference  text
);

-- Money movements. At most one of each kind per order: a double capture, double recognition or
-- double refund is a constraint violation, not a bug to find later.
CREATE TABLE ledger_entries (
    id         bigserial PRIMARY KEY,
    order_id   uuid NOT NULL REFERENCES orders (id),
    kind       text NOT NULL CHECK (kind IN ('captured', 'revenue', 'refunded')),
    amount_idr bigint NOT NULL CHECK (amount_idr > 0),
    at         timestamptz NOT NULL DEFAULT now(),
    UNIQUE (order_id, kind)
);
