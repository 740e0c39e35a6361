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
from vmckpt.storage.regions import Region, disk_regions, map_pages, place_disks, regions
from vmckpt.storage.restore import RestoreStats, restore_image


def open_store(path: str | Path, *, create: bool = False, readonly: bool = False,
               full_every: int = 16) -> PageStore:
    """Opens the store path names (creating it if asked and absent): a Redis Cluster for a
    URL redis://HOST:PORT[,HOST:PORT...]/NAME[?replicas=N], else the RocksDB directory."""
    from vmckpt.storage.cluster import ClusterStore, is_cluster_url
    from vmckpt.storage.rocks import RocksStore

    if is_cluster_url(path):
        return ClusterStore(str(path), create=create, readonly=readonly, full_every=full_every)

    return RocksStore(path, create=create, readonly=readonly, full_every=full_every)


__all__ = ["Damaged", "FormatMismatch", "MapDelta", "MissingPage", "NotAStore", "PageMap",
           "PageStore", "PutResult", "Region", "RestoreStats", "StoreError", "StoreFull",
           "StoreLocked", "UnknownCheckpoint", "ZERO_ID", "disk_regions", "get_blob",
           "map_pages", "open_store", "place_disks", "put_blob", "regions", "restore_image"]
