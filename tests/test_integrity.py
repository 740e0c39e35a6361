"""Planted damage against a store made by a real engine run of the synthetic guest: one flipped
byte in the table file of a record, a map or a page, a truncated table file, a lost MANIFEST or
CURRENT. For each, `vmckpt check` names exactly the damaged and the intact checkpoints (worked
out here behind vmckpt's back, from RocksDB's own answers), every read command says so in one
line naming the checkpoint, and `vmckpt check --repair` keeps exactly the intact ones, each
restoring bit-exact."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from rocksdict import AccessType, Options, Rdict
from test_inspect import assert_one_line_error, ok, run_synth, vmckpt
from vmckpt.storage import MapDelta, open_store, restore_image
from vmckpt.storage.envelope import HEADER

CHECKPOINTS = 12
FULL_EVERY = 4  # full maps at 1, 5, 9: damage in one chain leaves the others intact
FAMILIES = ("pages", "records", "maps")


def key(ckpt: int) -> bytes:
    return ckpt.to_bytes(8, "big")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> tuple[Path, dict[int, str]]:
    """The store, and the SHA-256 of each checkpoint's restored RAM before any damage."""
    tmp = tmp_path_factory.mktemp("made")
    store = tmp / "store"
    open_store(store, create=True, full_every=FULL_EVERY).close()
    run_synth(store, CHECKPOINTS)
    digests = {}
    with open_store(store, readonly=True) as s:
        assert [r["id"] for r in s.list_checkpoints()] == list(range(1, CHECKPOINTS + 1))
        for ckpt in range(1, CHECKPOINTS + 1):
            restore_image(s, ckpt, tmp / "img")
            digests[ckpt] = digest(tmp / "img")
    return store, digests


@pytest.fixture
def store(made, tmp_path) -> Path:
    return Path(shutil.copytree(made[0], tmp_path / "store"))


def options() -> Options:
    opts = Options(raw_mode=True)
    opts.set_paranoid_checks(False)  # opens with a truncated table file too
    return opts


def raw(store: Path) -> tuple[Rdict, dict[str, Rdict]]:
    """The store's RocksDB opened directly (read-only), to plant damage and to ask it what it
    can read behind vmckpt's back."""
    db = Rdict(str(store), options(), column_families={c: options() for c in FAMILIES},
               access_type=AccessType.read_only())
    return db, {c: db.get_column_family(c) for c in FAMILIES}


def close(db: Rdict, cfs: dict[str, Rdict]) -> None:
    for cf in cfs.values():
        cf.close()
    db.close()


def table_of(store: Path, family: str, k: bytes) -> Path:
    """The table file of family whose key range holds k (each family's tables are told
    apart by the family name RocksDB writes into their properties)."""
    db, cfs = raw(store)
    try:
        files = db.live_files()
    finally:
        close(db, cfs)
    found = [store / f["name"].lstrip("/") for f in files
             if len(f["start_key"]) == len(k) and f["start_key"] <= k <= f["end_key"]
             and family.encode() in (store / f["name"].lstrip("/")).read_bytes()]
    assert len(found) == 1, found
    return found[0]


def flip(path: Path, needle: bytes) -> None:
    """Flips a byte inside the one place needle is in the file (a data block)."""
    data = bytearray(path.read_bytes())
    at = data.find(needle)
    assert at >= 0 and data.find(needle, at + 1) < 0, "needle not found once"
    data[at + len(needle) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def sealed_crc(store: Path, family: str, ckpt: int) -> bytes:
    """The CRC-32 bytes of a record's or map's envelope: random, so found once in its table."""
    db, cfs = raw(store)
    try:
        return cfs[family][key(ckpt)][HEADER.size - 4:HEADER.size]
    finally:
        close(db, cfs)


def unreadable(store: Path, family: str, keys: list[bytes]) -> list[bytes]:
    """The keys RocksDB itself fails to read (a checksum error), asked one by one."""
    db, cfs = raw(store)
    bad = []
    try:
        for k in keys:
            try:
                cfs[family].get(k)
            except Exception:
                bad.append(k)
    finally:
        close(db, cfs)
    return bad


def page_table(store: Path, ckpt: int) -> tuple[bytes, Path, bytes]:
    """A page that checkpoint ckpt's delta stored, whose bytes its table file holds as they are
    (an incompressible block): (page id, table file, a stretch of its bytes found only there)."""
    with open_store(store, readonly=True) as s:
        _, delta = MapDelta.decode(s.map_blob(ckpt))
    db, cfs = raw(store)
    try:
        tables = [store / f["name"].lstrip("/") for f in db.live_files()
                  if len(f["start_key"]) == 32]
        contents = {t: t.read_bytes() for t in tables}
        for pid in (bytes(row) for row in delta.ids if row.any()):
            page = cfs["pages"][pid]
            for at in range(0, len(page), 256):  # guest pages share stretches: find its own
                needle = page[at:at + 64]
                where = [t for t, data in contents.items() if needle in data]
                if len(where) == 1 and contents[where[0]].count(needle) == 1:
                    return pid, where[0], needle
    finally:
        close(db, cfs)
    raise AssertionError(f"no page of checkpoint {ckpt} is stored as it is")
