"""What both backends do alike with records and maps: decoding a record, reading a map down
its delta chain, and choosing a new checkpoint's map (a delta on its parent's, or a full map
every full_every and at a root). A backend only stores and fetches the bytes."""

from __future__ import annotations

from typing import Protocol

import msgpack
from vmckpt.storage.errors import Damaged
from vmckpt.storage.pagemap import MapDelta, PageMap
from vmckpt.storage.regions import map_pages


class Chained(Protocol):
    path: object  # where the store is, as messages say it
    full_every: int

    def get_record(self, ckpt: int | str) -> dict: ...

    def map_blob(self, ckpt: int, *, must: bool = False) -> bytes | None: ...


def decode_record(store: Chained, ckpt: int, payload: bytes) -> dict:
    try:
        rec = msgpack.unpackb(payload)
        if not isinstance(rec, dict) or rec.get("id") != ckpt:
            raise ValueError("it names another checkpoint")
    except ValueError as e:
        raise Damaged(store.path, f"the record of checkpoint {ckpt} cannot be decoded ({e})",
                      (ckpt,)) from None
    return rec


def read_map(store: Chained, ckpt: int | str) -> PageMap:
    """The checkpoint's whole map: its own blob, and its parents' down to a full map."""
    rec = top = store.get_record(ckpt)
    chain: list[MapDelta] = []
    try:
        while True:
            try:
                kind, delta = MapDelta.decode(store.map_blob(rec["id"], must=True))
            except (ValueError, KeyError, TypeError) as e:
                raise Damaged(store.path, f"the map of checkpoint {rec['id']} cannot be "
                              f"decoded ({e})", (rec["id"],)) from None
            chain.append(delta)
            if kind == "full":
                break
            rec = store.get_record(rec["parent"])
    except Damaged as e:
        if not chain:  # its own map
            raise
        # Further down the chain: say which checkpoint this restore needed it for.
        where = e.checkpoints[0] if e.checkpoints else rec["id"]
        raise Damaged(store.path, f"checkpoint {top['id']} cannot be restored: its map "
                      f"chain goes through checkpoint {where}, and {e.what}",
                      (top["id"], *e.checkpoints)) from None
    pmap = PageMap.empty(map_pages(rec))
    for delta in reversed(chain):
        pmap.apply(delta)
    return pmap


def next_map(store: Chained, record: dict, delta: MapDelta) -> tuple[dict, bytes]:
    """The new checkpoint's map as stored, and the record's "map" entry for it."""
    parent = record.get("parent")
    depth = 0
    if parent is not None:
        depth = store.get_record(parent)["map"]["depth"] + 1
    if parent is None or depth >= store.full_every:
        full = read_map(store, parent) if parent is not None else \
            PageMap.empty(map_pages(record))
        full.apply(delta)
        kind, depth, blob = "full", 0, full.sparse().encode("full")
    else:
        kind, blob = "delta", delta.encode("delta")
    return {"kind": kind, "depth": depth, "bytes": len(blob)}, blob
