"""Page maps: which page id sits at which guest page frame, whole or as a delta."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import msgpack
import numpy as np

ID_BYTES = 32
ZERO_ID = bytes(ID_BYTES)  # in a delta: the frame is all-zero now; never stored


def page_ids(pages: np.ndarray) -> np.ndarray:
    """Page ids as the engine computes them (SHA-256; ZERO_ID for an all-zero page), in Python:
    for small amounts (device state) and for verifying stored pages."""
    ids = np.zeros((len(pages), ID_BYTES), np.uint8)
    for i, page in enumerate(pages):
        if page.any():
            ids[i] = np.frombuffer(hashlib.sha256(page).digest(), np.uint8)
    return ids


@dataclass
class MapDelta:
    """Changed frames: pfns uint64[n] (unique) -> ids uint8[n, 32]."""

    pfns: np.ndarray
    ids: np.ndarray

    def encode(self, kind: str) -> bytes:
        return msgpack.packb({"kind": kind, "pfns": self.pfns.astype("<u8").tobytes(),
                              "ids": np.ascontiguousarray(self.ids, np.uint8).tobytes()})

    @staticmethod
    def decode(blob: bytes) -> tuple[str, MapDelta]:
        d = msgpack.unpackb(blob)
        pfns = np.frombuffer(d["pfns"], "<u8").astype(np.uint64)
        ids = np.frombuffer(d["ids"], np.uint8).reshape(-1, ID_BYTES)
        return d["kind"], MapDelta(pfns, ids)


@dataclass
class PageMap:
    """A whole map: ids uint8[npages, 32], zero rows are holes (all-zero frames)."""

    npages: int
    ids: np.ndarray

    @classmethod
    def empty(cls, npages: int) -> PageMap:
        return cls(npages, np.zeros((npages, ID_BYTES), np.uint8))

    def apply(self, delta: MapDelta) -> None:
        self.ids[delta.pfns.astype(np.int64)] = delta.ids

    def nonzero_pfns(self) -> np.ndarray:
        return np.flatnonzero(self.ids.any(axis=1))

    def sparse(self) -> MapDelta:
        """Only the frames that hold data: a full map as it is stored."""
        pfns = self.nonzero_pfns()
        return MapDelta(pfns.astype(np.uint64), self.ids[pfns])

    def copy(self) -> PageMap:
        return PageMap(self.npages, self.ids.copy())
