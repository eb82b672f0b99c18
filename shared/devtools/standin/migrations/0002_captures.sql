-- When the buyer's money was taken (settlement, or a card capture): the list of captures a merchant
-- reconciles against, and the clock a card capture settles by.
ALTER TABLE transactions ADD COLUMN captured_at timestamptz;
UPDATE transactions SET captured_at = updated_at
WHERE transaction_status IN ('settlement', 'capture', 'refund', 'partial_refund');
CREATE INDEX transactions_captured ON transactions (captured_at) WHERE captured_at IS NOT NULL;
CREATE INDEX transactions_unsettled ON transactions (captured_at) WHERE transaction_status = 'capture';
