-- Two more kinds of e-mail to buyers: an order closed before payment because its document can't be
-- stamped ('rejected'), and one closed unpaid ('expired': not paid in time, or the payment never opened),
-- so a buyer who closed the tab after the upload hears of it. The outbox's kinds and the bound on an
-- order's link tokens (one per kind, shared/orders.py MAX_LINK_TOKENS) grow with them.
--
-- Both constraints get looser, so every existing row satisfies them: added NOT VALID (no scan under the
-- lock), and the lock is given up after 3 s rather than queueing every create behind a long transaction.
SET LOCAL lock_timeout = '3s';
ALTER TABLE mail_outbox DROP CONSTRAINT IF EXISTS mail_outbox_kind_check;
ALTER TABLE mail_outbox ADD CONSTRAINT mail_outbox_kind_check
    CHECK (kind IN ('receipt', 'stamped', 'refund_manual', 'refunded', 'rejected', 'expired')) NOT VALID;
ALTER TABLE orders DROP CONSTRAINT IF EXISTS orders_link_tokens_bounded;
ALTER TABLE orders ADD CONSTRAINT orders_link_tokens_bounded
    CHECK (cardinality(link_token_hashes) <= 6) NOT VALID;
