"""Byte strings of any length (device state) kept as 4 KiB pages in the page store, so an
unchanged part of one checkpoint's state costs nothing in the next."""

from __future__ import annotations

import numpy as np
from vmckpt.storage.interface import PageStore
from vmckpt.storage.pagemap import ID_BYTES, ZERO_ID, page_ids


def put_blob(store: PageStore, data: bytes) -> dict:
    """Stores data; returns the reference a record keeps: its size and its page ids."""
    size = store.page_size
    npages = -(-len(data) // size)
    pages = np.zeros((npages, size), np.uint8)
    pages.reshape(-1)[:len(data)] = np.frombuffer(data, np.uint8)
    ids = page_ids(pages)
    store.put_pages(ids, pages)
    return {"size": len(data), "ids": ids.tobytes()}


def get_blob(store: PageStore, ref: dict) -> bytes:
    ids = [ref["ids"][i:i + ID_BYTES] for i in range(0, len(ref["ids"]), ID_BYTES)]
    stored = iter(store.get_pages([pid for pid in ids if pid != ZERO_ID]))
    zero = bytes(store.page_size)
    return b"".join(zero if pid == ZERO_ID else next(stored) for pid in ids)[:ref["size"]]
