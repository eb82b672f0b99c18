-- E-mails to buyers: the receipt when an order is made, and a message when it is stamped, goes to manual
-- payout, or is refunded (shared/services/mail.py). Each is a row of a transactional outbox, written in
-- the same transaction as the order change it tells of (shared/lifecycle.py), so an e-mail is never
-- promised for a change that rolled back nor lost for one that committed; UNIQUE (order_id, kind) makes
-- it one e-mail per event however often the event's task runs.
--
-- link_token_hashes: the access tokens the mail worker mints for the links it sends (only their SHA-256
-- hashes, like access_token_hashes). Kept apart from access_token_hashes, which replays of a create trim
-- to the newest eight, so a replay never breaks a link in a buyer's mailbox. One per e-mail: every
-- attempt of an outbox row sends the same token (made from mail_outbox.link_salt), so there are never more than
-- the four kinds of e-mail, never trimmed, bounded by the CHECK.
--
-- Adding a column with a constant default is a catalogue change only; the CHECK is added NOT VALID (every
-- old row holds the empty array), and the lock is given up after 3 s rather than queueing every create
-- behind a long transaction.
SET LOCAL lock_timeout = '3s';
ALTER TABLE orders ADD COLUMN IF NOT EXISTS link_token_hashes text[] NOT NULL DEFAULT '{}';
ALTER TABLE orders DROP CONSTRAINT IF EXISTS orders_link_tokens_bounded;
ALTER TABLE orders ADD CONSTRAINT orders_link_tokens_bounded
    CHECK (cardinality(link_token_hashes) <= 4) NOT VALID;

CREATE TABLE IF NOT EXISTS mail_outbox (
    id                bigserial PRIMARY KEY,
    order_id          uuid NOT NULL REFERENCES orders (id),
    kind              text NOT NULL CHECK (kind IN ('receipt', 'stamped', 'refund_manual', 'refunded')),
    -- pending → sending (claimed under a lease) → sent; back to pending after a failed attempt; failed
    -- once the attempts run out or the recipient is refused for good (the named final state).
    status            text NOT NULL DEFAULT 'pending'
                      CHECK (status IN ('pending', 'sending', 'sent', 'failed')),
    attempts          integer NOT NULL DEFAULT 0,
    lease_owner       text,
    lease_expires_at  timestamptz,
    last_error        text,
    -- The random salt this e-mail's link token is made from with SECRET_KEY (shared/orders.py
    -- link_token), drawn with the row's first claim (the token's hash goes into orders.link_token_hashes in
    -- the same transaction), so every attempt sends one link and no bearer token is stored here. Cleared
    -- once the row is sent; cleared (and the hash dropped) when the row fails without any attempt that may
    -- have reached the server; kept on a failed row that may have been delivered, so `meterai mail-retry`
    -- sends the link the buyer may already hold.
    link_salt         text,
    -- An attempt's outcome was in doubt (the connection broke after DATA, or a worker died holding the
    -- lease): the e-mail may be in the buyer's mailbox, so its link must keep working.
    maybe_delivered   boolean NOT NULL DEFAULT false,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    sent_at           timestamptz,
    UNIQUE (order_id, kind)
);
-- The redrive's scan: only rows still to send.
CREATE INDEX IF NOT EXISTS mail_outbox_unsent ON mail_outbox (updated_at)
    WHERE status IN ('pending', 'sending');
-- The failed rows (to re-queue with `meterai mail-retry`, and counted at scrape time).
CREATE INDEX IF NOT EXISTS mail_outbox_failed ON mail_outbox (updated_at) WHERE status = 'failed';
