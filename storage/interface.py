"""The store's contract: what the engine and the CLI use, and a distributed backend implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from vmckpt.storage.errors import Damaged, MissingPage
from vmckpt.storage.pagemap import MapDelta, PageMap


@dataclass
class PutResult:
    new: int    # pages written
    dup: int    # pages the store already had (dedup hits)
    bytes: int  # bytes written


@dataclass
class Sweep:
    stored: int  # pages stored when the sweep began
    freed: int   # of those, pages deleted (or that would be, on a dry run)


class PageStore(ABC):
    page_size = 4096

    @abstractmethod
    def put_pages(self, ids: np.ndarray, pages: np.ndarray) -> PutResult:
        """Stores the pages it does not have yet (ids uint8[n,32], pages uint8[n,4096]);
        rows whose id is ZERO_ID are all-zero pages: skipped, counted neither new nor dup."""

    @abstractmethod
    def has_pages(self, ids: np.ndarray) -> np.ndarray: ...

    @abstractmethod
    def get_pages(self, ids: Sequence[bytes]) -> list[bytes]:
        """The pages, in order; MissingPage or Damaged (naming the page) if one cannot be
        read."""

    def fetch_pages(self, ids: Sequence[bytes]) -> list[bytes | None | Damaged]:
        """Like get_pages, but a page that is missing is None and one that cannot be read is
        its error, so that one bad page does not hide the others (vmckpt check)."""
        out: list[bytes | None | Damaged] = []
        for pid in ids:
            try:
                out.append(self.get_pages([pid])[0])
            except MissingPage:
                out.append(None)
            except Damaged as e:
                out.append(e)
        return out

    @abstractmethod
    def commit_checkpoint(self, record: dict, delta: MapDelta) -> int:
        """Makes a checkpoint visible, atomically, after its pages; returns its id."""

    @abstractmethod
    def list_checkpoints(self) -> list[dict]:
        """Every record, in id order; Damaged (naming them) if some do not read back."""

    def read_records(self) -> tuple[list[dict], dict[int, str]]:
        """The records that read back, and why each other one does not, by id."""
        return self.list_checkpoints(), {}

    @abstractmethod
    def get_record(self, ckpt: int | str) -> dict: ...

    @abstractmethod
    def read_map(self, ckpt: int | str) -> PageMap: ...

    @abstractmethod
    def close(self) -> None: ...

    # Inspection (vmckpt show/stats/check): the store as it is, without interpreting it.

    @abstractmethod
    def format_info(self) -> dict:
        """The store's format record: name, version, page_size, hash, full_every."""

    @abstractmethod
    def map_blob(self, ckpt: int) -> bytes | None:
        """A checkpoint's map as the engine encoded it (MapDelta.encode), or None if it has
        none; Damaged if it does not read back as it was written."""

    @abstractmethod
    def iter_pages(self) -> Iterator[tuple[bytes, bytes]]:
        """Every stored (page id, page), for verifying pages against their ids."""

    @abstractmethod
    def page_count(self) -> int:
        """How many pages the store holds."""

    @abstractmethod
    def disk_usage(self) -> dict[str, int]:
        """Bytes on disk: "pages", "records", "maps" (each one's table files) and "total"."""

    # Maintenance (vmckpt prune/gc): safe while an engine in the same process commits.

    @abstractmethod
    def editing(self) -> AbstractContextManager[None]:
        """Holds commits and other maintenance off, so that records read inside stay true
        until replace_checkpoints writes what was decided from them."""

    @abstractmethod
    def replace_checkpoints(self, drop: Sequence[int], records: Sequence[dict],
                            maps: dict[int, bytes]) -> None:
        """In one atomic write: deletes the checkpoints drop (records and maps), stores the
        updated records and the rewritten maps. Ids are never given out again."""

    @abstractmethod
    def sweep(self, mark: Callable[[], set[bytes]], *, dry_run: bool = False) -> Sweep:
        """Deletes every stored page that is not live: live = what mark() returns (the pages
        committed checkpoints name; it runs while pages may still be put) and every page put,
        new or deduplicated, by a checkpoint not yet committed when the sweep began or while
        it ran. dry_run: only counts."""

    def held_checkpoints(self) -> set[int]:
        """Checkpoints that writers in other processes continue from: prune keeps them."""
        return set()

    def recover(self) -> bool:
        """After a StoreFull: whether the store takes writes again (a backend may reopen
        itself here). The engine asks before it tries another checkpoint."""
        return True

    def truncated_tables(self) -> list[str]:
        """Files of the store that are not the size they were written with, each said as a
        reason ("table file ... is N bytes where ..."); none for a backend that cannot tell."""
        return []

    def discard_if_unused(self) -> None:
        """Closes the store; if this open created it and no checkpoint was committed into it,
        takes it away again (a run refused before it started)."""
        self.close()

    def control_socket(self) -> Path | None:
        """Where an engine holding this store answers maintenance requests (None: nowhere)."""
        return None

    def __enter__(self) -> PageStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
