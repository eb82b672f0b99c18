"""The filesystem document store: keys it accepts, and durability of what it stores."""
from __future__ import annotations

import uuid

import pytest

from shared.store import DocumentMissing, FilesystemStore, stamped_key, upload_key


def test_only_our_own_key_shapes_name_a_file(tmp_path):
    store = FilesystemStore(tmp_path)
    order_id = uuid.uuid4()
    for good in (upload_key(order_id), stamped_key(order_id, 3)):
        store.put(good, b"%PDF-1.7 x")
        assert store.get(good) == b"%PDF-1.7 x"
    for bad in (upload_key(order_id) + "\n", f"uploads/../{order_id}.pdf", f"/etc/{order_id}.pdf",
                f"uploads/{order_id}.pdf.tmp", "uploads/x.pdf"):
        with pytest.raises(ValueError):
            store.put(bad, b"x")
    with pytest.raises(DocumentMissing):
        store.get(upload_key(uuid.uuid4()))
