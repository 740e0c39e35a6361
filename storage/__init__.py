"""vmckpt's bottom floor: the content-addressed page store and restore. Imports no engine."""

from pathlib import Path

from vmckpt.storage.blob import get_blob, put_blob
from vmckpt.storage.errors import (
    Damaged,
    FormatMismatch,
    MissingPage,
    NotAStore,
    StoreError,
    StoreFull,
    StoreLocked,
    UnknownCheckpoint,
)
from vmckpt.storage.interface import PageStore, PutResult
from vmckpt.storage.pagemap import ZERO_ID, MapDelta, PageMap
from vmckpt.storage.restore import RestoreStats, restore_image


def open_store(path: str | Path, *, create: bool = False, readonly: bool = False,
               full_every: int = 16) -> PageStore:
    """Opens the embedded RocksDB store at path (creating it if asked and absent)."""
    from vmckpt.storage.rocks import RocksStore

    return RocksStore(path, create=create, readonly=readonly, full_every=full_every)


__all__ = ["Damaged", "FormatMismatch", "MapDelta", "MissingPage", "NotAStore", "PageMap",
           "PageStore", "PutResult", "RestoreStats", "StoreError", "StoreFull", "StoreLocked",
           "UnknownCheckpoint", "ZERO_ID", "get_blob", "open_store", "put_blob", "restore_image"]
