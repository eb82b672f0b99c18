"""Payment notifications at the door: what we keep of one, and when one more is worth keeping at all.

A notification is only a hint (the payments worker confirms every one with a status query before any
money moves), but the door is public: anyone holding one genuine notification can send it again, with
other unsigned fields, as often as they like. So:

* only the fields we know are kept, each a short string (a 256 KB extra field is not stored);
* ``transaction_status`` must be a status Midtrans sends (it is not covered by the signature, so an
  unknown one would make every replay look new);
* duplicates are recognised by what the signature covers plus the status: a replay with a new
  ``transaction_id`` or other unsigned noise is the same notification;
* one gateway order keeps at most :data:`MAX_PER_GATEWAY_ORDER` distinct notifications (a real payment
  sends a handful); beyond that a notification is answered but not stored or queued.
"""
from __future__ import annotations

import hashlib
import json
import logging
from typing import Any, Mapping

from shared import jobs
from shared.config import Settings
from shared.db import get_pool
from shared.logs import log_event

log = logging.getLogger(__name__)

MAX_PER_GATEWAY_ORDER = 32
MAX_FIELD_CHARACTERS = 256

# Midtrans' transaction_status values; anything else is refused at the door.
TRANSACTION_STATUSES = frozenset({
    "pending", "authorize", "capture", "settlement", "expire", "cancel", "deny", "failure", "refund",
    "partial_refund", "chargeback", "partial_chargeback",
})
# The scalar fields of a Midtrans notification we keep (Core API "HTTP notification" reference).
KNOWN_FIELDS = (
    "order_id", "transaction_id", "transaction_status", "status_code", "status_message", "gross_amount",
    "signature_key", "payment_type", "fraud_status", "transaction_time", "settlement_time", "merchant_id",
    "currency", "approval_code", "masked_card", "bank", "card_type", "permata_va_number", "bill_key",
    "biller_code", "refund_amount", "expiry_time",
)
MAX_VA_NUMBERS = 4


class NotificationRefused(ValueError):
    """The body is signed correctly but is not a notification we can take (the message says why)."""


def known_fields(body: Mapping[str, Any]) -> dict[str, Any]:
    """The notification as we store it: known fields only, each text of bounded length."""
    kept: dict[str, Any] = {}
    for name in KNOWN_FIELDS:
        value = body.get(name)
        if value is None or isinstance(value, (dict, list)):
            continue
        text = str(value)
        if len(text) > MAX_FIELD_CHARACTERS:
            raise NotificationRefused(f"field {name} is longer than {MAX_FIELD_CHARACTERS} characters")
        kept[name] = text
    numbers = body.get("va_numbers")
    if isinstance(numbers, list):
        kept["va_numbers"] = [
            {key: str(entry.get(key))[:MAX_FIELD_CHARACTERS] for key in ("bank", "va_number")
             if entry.get(key) is not None}
            for entry in numbers[:MAX_VA_NUMBERS] if isinstance(entry, dict)
        ]
    if kept.get("transaction_status") not in TRANSACTION_STATUSES:
        raise NotificationRefused("transaction_status is not one the gateway sends")
    return kept


def notification_fingerprint(body: Mapping[str, Any]) -> str:
    """What makes two notifications the same: the signed fields and the status."""
    parts = [str(body.get(k, "")) for k in ("order_id", "status_code", "gross_amount", "transaction_status")]
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


# One statement on an autocommit connection: committed when it returns, in one round trip; the count
# and the insert see the same snapshot, so concurrent replays can overshoot the bound by a few at most.
_INSERT = f"""
INSERT INTO payment_notifications
    (gateway_order_id, transaction_status, status_code, transaction_id, fingerprint, body)
SELECT %(gateway_order_id)s, %(transaction_status)s, %(status_code)s, %(transaction_id)s, %(fingerprint)s,
       %(body)s
WHERE (SELECT count(*) FROM payment_notifications WHERE gateway_order_id = %(gateway_order_id)s)
      < {MAX_PER_GATEWAY_ORDER}
ON CONFLICT (fingerprint) DO NOTHING
RETURNING id
"""


def accept_notification(settings: Settings, body: Mapping[str, Any]) -> bool:
    """Store a verified notification and queue its processing; False if it is a duplicate (or one too
    many for its gateway order). Raises :class:`NotificationRefused` for a body we can't take."""
    kept = known_fields(body)
    with get_pool(settings.database_url).connection() as conn:
        row = conn.execute(_INSERT, {
            "gateway_order_id": kept.get("order_id", ""), "transaction_status": kept["transaction_status"],
            "status_code": kept.get("status_code", ""), "transaction_id": kept.get("transaction_id"),
            "fingerprint": notification_fingerprint(kept), "body": json.dumps(kept),
        }).fetchone()
    if row is None:
        return False
    jobs.publish_committed(jobs.PROCESS_NOTIFICATION, row["id"])
    return True
