"""The embedded store: RocksDB (rocksdict) with pages, records and maps in column families."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

import msgpack
import numpy as np
from rocksdict import (
    AccessType,
    BlockBasedOptions,
    DBCompressionType,
    Options,
    Rdict,
    WriteBatch,
    WriteOptions,
)
from vmckpt.storage.errors import (
    FormatMismatch,
    MissingPage,
    NotAStore,
    StoreError,
    StoreFull,
    StoreLocked,
    UnknownCheckpoint,
)
from vmckpt.storage.interface import PageStore, PutResult, Sweep
from vmckpt.storage.pagemap import ID_BYTES, ZERO_ID, MapDelta, PageMap

FORMAT = {"name": "vmckpt-store", "version": 1, "page_size": 4096, "hash": "sha256"}
CFS = ("pages", "records", "maps")
LAST_ID = b"last_id"  # the highest id ever given out, once a prune has dropped the newest
OPEN_ATTEMPTS = 20  # read-only opens, while a writer compacts
CONTROL_SOCKET = "control.sock"  # RocksDB leaves files it did not make alone
# A write RocksDB refuses with an I/O error means the store cannot take more; these name the
# usual causes, the strerror of ENOSPC, EDQUOT and EIO (its own no-space status carries the
# first; after one, it may say only "Writer has previous error").
IO_ERROR = "IO error"
FULL_TEXTS = ("No space left on device", "Disk quota exceeded", "Input/output error")
PROBE = b"probe"  # a key deleted (never written) to learn whether RocksDB takes writes again
REOPEN_FREE = 64 << 20  # free bytes on the store's filesystem before recover() reopens it


def control_socket(path: str | Path) -> Path:
    """Where an engine holding the store at path answers maintenance requests."""
    return Path(path) / CONTROL_SOCKET


def _key(ckpt: int) -> bytes:
    return ckpt.to_bytes(8, "big")


def _options() -> Options:
    opts = Options(raw_mode=True)
    opts.create_if_missing(True)
    opts.create_missing_column_families(True)
    opts.set_write_buffer_size(128 << 20)
    opts.set_max_write_buffer_number(4)
    opts.increase_parallelism(2)
    opts.set_compression_type(DBCompressionType.lz4())
    table = BlockBasedOptions()
    table.set_bloom_filter(10, False)  # absent-page checks stay off the disk
    opts.set_block_based_table_factory(table)
    return opts


class RocksStore(PageStore):
    def __init__(self, path: str | Path, *, create: bool = False, readonly: bool = False,
                 full_every: int = 16) -> None:
        self.path = Path(path)
        fresh = not self.path.exists() or (self.path.is_dir() and not any(self.path.iterdir()))
        if self.path.exists() and not self.path.is_dir():
            raise NotAStore(f"{self.path} is a file, not a vmckpt store")
        if fresh and (readonly or not create):
            raise NotAStore(f"no vmckpt store at {self.path}")
        if not fresh and not (self.path / "CURRENT").exists():
            raise NotAStore(f"{self.path} is not a vmckpt store (and not empty)")
        self._connect(readonly)
        meta = self.db.get(b"format")
        if meta is None:
            if not fresh:
                self.db.close()
                raise NotAStore(f"{self.path} is a RocksDB database but not a vmckpt store")
            self.db[b"format"] = msgpack.packb({**FORMAT, "full_every": full_every})
            meta = self.db.get(b"format")
        fmt = msgpack.unpackb(meta)
        if fmt.get("name") != FORMAT["name"] or fmt.get("version") != FORMAT["version"]:
            self.db.close()
            raise FormatMismatch(f"{self.path} is a store of format {fmt.get('name')} "
                                 f"v{fmt.get('version')}; this vmckpt reads v{FORMAT['version']}")
        self.full_every = int(fmt["full_every"])
        self._lock = threading.Lock()  # the pages: puts (their dedup lookups), a sweep
        self._commits = threading.RLock()  # commits and edits of records and maps
        self._maintenance = threading.Lock()  # one prune or gc at a time
        # Page ids put (new or dup) since the last commit, and while a sweep runs every id
        # put: pages of a checkpoint in flight, which no record names yet.
        self._uncommitted: set[bytes] = set()
        self._young: set[bytes] | None = None
        self._last = self._newest()
        self._high = max(self._last, int.from_bytes(self.db.get(LAST_ID) or b"", "big"))
        self._sync = WriteOptions()
        self._sync.sync = True
        self._nowal = WriteOptions()
        self._nowal.disable_wal = True

    def _open(self, readonly: bool) -> Rdict:
        access = AccessType.read_only() if readonly else AccessType.read_write()
        attempts = OPEN_ATTEMPTS if readonly else 1
        while True:
            try:
                return Rdict(str(self.path), _options(),
                             column_families={c: _options() for c in CFS}, access_type=access)
            except Exception as e:
                text = str(e)
                if "lock" in text.lower():
                    raise StoreLocked(f"store {self.path} is locked by another process "
                                      "(a running engine?)") from None
                # A reader races the writer's compactions (gc runs one): a table file the
                # manifest it read names may be gone by the time it opens it. Read again.
                attempts -= 1
                if "No such file" not in text or not attempts:
                    raise StoreError(f"cannot open store {self.path}: {text}") from None

    def put_pages(self, ids: np.ndarray, pages: np.ndarray) -> PutResult:
        raw_ids = np.ascontiguousarray(ids).tobytes()
        raw = memoryview(np.ascontiguousarray(pages)).cast("B")
        size = self.page_size
        pids = [raw_ids[i:i + ID_BYTES] for i in range(0, len(raw_ids), ID_BYTES)]
        new = dup = 0
        with self._lock, self._writing():
            batch = WriteBatch(raw_mode=True)
            batch.set_default_column_family(self.cfh["pages"])
            fresh: set[bytes] = set()  # put by this call: a repeat in it is a dedup hit
            nonzero = [i for i, pid in enumerate(pids) if pid != ZERO_ID]
            for i, page in zip(nonzero, self._lookup([pids[i] for i in nonzero]), strict=True):
                pid = pids[i]
                if page is not None or pid in fresh:
                    dup += 1
                    continue
                fresh.add(pid)
                batch.put(pid, raw[i * size:(i + 1) * size].tobytes())
                new += 1
            if new:
                # No WAL: pages are made durable by the flush in commit_checkpoint, before any
                # record names them; a crash before that loses only pages nothing refers to.
                self.db.write(batch, self._nowal)
            # After the write (under the lock, so no sweep sees one without the other): a
            # failed put names nothing a commit could need.
            put = [pids[i] for i in nonzero]
            self._uncommitted.update(put)
            if self._young is not None:
                self._young.update(put)
        return PutResult(new, dup, new * size)

    def _lookup(self, pids: list[bytes]) -> list[bytes | None]:
        """The stored pages of pids (None where absent), for dedup. Asks the store itself,
        not a set of every id in memory: one multi-get, whose bloom filters answer an absent
        id without reading the disk (~0.4 us an id; ~2 us a present one)."""
        return self.cf["pages"].get(pids) if pids else []

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """Turns RocksDB's I/O errors on writes (no space, quota, a failing disk) into StoreFull:
        what was committed stays sound; RocksDB refuses every write until recover()."""
        if self.db is None:
            raise StoreFull(f"store {self.path} is closed after a failed write")
        try:
            yield
        except StoreError:
            raise
        except Exception as e:
            text = str(e)
            if not text.startswith(IO_ERROR):
                raise
            reason = next((t for t in FULL_TEXTS if t in text),
                          text.removeprefix(IO_ERROR).lstrip(": ").split(";")[0])
            raise StoreFull(f"store {self.path} cannot take more: {reason}") from None

    def _takes_writes(self) -> bool:
        try:
            with self._writing():
                self.db.delete(PROBE, self._nowal)
        except StoreFull:
            return False
        return True

    def recover(self) -> bool:
        """After a StoreFull: whether the store takes writes again. RocksDB lifts its own
        out-of-space error once the disk has room for a memtable (it looks every 5 s); after
        other errors, or with less room, the database is reopened here, which drops the pages
        put since the last commit (no record names them, and dedup asks the store)."""
        with self._maintenance, self._commits, self._lock:
            if self._takes_writes():
                return True
            st = os.statvfs(self.path)
            if st.f_bavail * st.f_frsize < REOPEN_FREE:
                return False
            if self.db is not None:
                self._disconnect()
            try:
                self._connect(readonly=False)
            except StoreError:
                return False  # still closed: writes say StoreFull, the next recover() retries
            return self._takes_writes()

    def _connect(self, readonly: bool) -> None:
        self.db = self._open(readonly)
        self.cf = {c: self.db.get_column_family(c) for c in CFS}
        self.cfh = {c: self.db.get_column_family_handle(c) for c in CFS}

    def _disconnect(self) -> None:
        # Column family handles keep the database (and its lock) alive: drop them first. A
        # close after a failed write reports that failure again, and closes all the same.
        for cf in self.cf.values():
            with suppress(Exception):
                cf.close()
        self.cf, self.cfh = {}, {}
        with suppress(Exception):
            self.db.close()
        self.db = None

    def _newest(self) -> int:
        return max((int.from_bytes(k, "big") for k in self.cf["records"].keys()),  # noqa: SIM118
                   default=0)

    def has_pages(self, ids: np.ndarray) -> np.ndarray:
        raw = np.ascontiguousarray(ids).tobytes()
        pids = [raw[i:i + ID_BYTES] for i in range(0, len(raw), ID_BYTES)]
        return np.array([page is not None for page in self._lookup(pids)], bool)

    def get_pages(self, ids: Sequence[bytes]) -> list[bytes]:
        got = self.cf["pages"].get(list(ids))
        for pid, page in zip(ids, got, strict=True):
            if page is None:
                raise MissingPage(f"page {pid.hex()} is missing from {self.path}")
        return got

    def _resolve(self, ckpt: int | str) -> int:
        if ckpt == "latest":
            if not self._last:
                raise UnknownCheckpoint(f"store {self.path} holds no checkpoint")
            return self._last
        if not isinstance(ckpt, int) or self.cf["records"].get(_key(ckpt)) is None:
            raise UnknownCheckpoint(f"no checkpoint {ckpt} in {self.path}")
        return ckpt

    def get_record(self, ckpt: int | str) -> dict:
        return msgpack.unpackb(self.cf["records"][_key(self._resolve(ckpt))])

    def list_checkpoints(self) -> list[dict]:
        return [msgpack.unpackb(v) for v in self.cf["records"].values()]

    def read_map(self, ckpt: int | str) -> PageMap:
        chain: list[MapDelta] = []
        rec = self.get_record(ckpt)
        while True:
            kind, delta = MapDelta.decode(self.cf["maps"][_key(rec["id"])])
            chain.append(delta)
            if kind == "full":
                break
            rec = self.get_record(rec["parent"])
        pmap = PageMap.empty(rec["ram_size"] // self.page_size)
        for delta in reversed(chain):
            pmap.apply(delta)
        return pmap

    def commit_checkpoint(self, record: dict, delta: MapDelta) -> int:
        with self._commits:  # a prune may not change the parent's chain under us
            parent = record.get("parent")
            depth = 0
            if parent is not None:
                depth = self.get_record(parent)["map"]["depth"] + 1
            if parent is None or depth >= self.full_every:
                full = self.read_map(parent) if parent is not None else \
                    PageMap.empty(record["ram_size"] // self.page_size)
                full.apply(delta)
                kind, depth, blob = "full", 0, full.sparse().encode("full")
            else:
                kind, blob = "delta", delta.encode("delta")
            with self._lock, self._writing():
                self.cf["pages"].flush()  # the pages this record names are on disk before it
                ckpt = self._high + 1
                record = {**record, "id": ckpt,
                          "map": {"kind": kind, "depth": depth, "bytes": len(blob)}}
                batch = WriteBatch(raw_mode=True)
                batch.put(_key(ckpt), blob, self.cfh["maps"])
                batch.put(_key(ckpt), msgpack.packb(record), self.cfh["records"])
                self.db.write(batch, self._sync)  # the one atomic write that makes it visible
                self._last = self._high = ckpt
                self._uncommitted.clear()  # a record names them now
        return ckpt

    @contextmanager
    def editing(self) -> Iterator[None]:
        with self._maintenance, self._commits:
            yield

    def replace_checkpoints(self, drop: Sequence[int], records: Sequence[dict],
                            maps: dict[int, bytes]) -> None:
        batch = WriteBatch(raw_mode=True)
        for ckpt in drop:
            batch.delete(_key(ckpt), self.cfh["records"])
            batch.delete(_key(ckpt), self.cfh["maps"])
        for rec in records:
            batch.put(_key(rec["id"]), msgpack.packb(rec), self.cfh["records"])
        for ckpt, blob in maps.items():
            batch.put(_key(ckpt), blob, self.cfh["maps"])
        with self._commits, self._writing():
            # Ids stay unique: if the newest goes, the highest id given out is kept.
            batch.put(LAST_ID, self._high.to_bytes(8, "big"))
            self.db.write(batch, self._sync)
            self._last = self._newest()

    def sweep(self, mark: Callable[[], set[bytes]], *, dry_run: bool = False) -> Sweep:
        with self._maintenance:
            with self._lock:
                live = set(self._uncommitted)
                self._young = set()
            try:
                live |= mark()
                # A scan of the stored ids while pages are put: any put since the sweep began
                # (new or a dedup hit) is in _young, and is spared below.
                stored, garbage = 0, []
                for pid in self.cf["pages"].keys():  # noqa: SIM118 (a column family)
                    stored += 1
                    if pid not in live:
                        garbage.append(pid)
                # Under the lock no put interleaves: a later put of a swept id does not find
                # it in the store and writes it again.
                with self._lock:
                    garbage = [pid for pid in garbage if pid not in self._young]
                    if garbage and not dry_run:
                        batch = WriteBatch(raw_mode=True)
                        batch.set_default_column_family(self.cfh["pages"])
                        for pid in garbage:
                            batch.delete(pid)
                        with self._writing():
                            self.db.write(batch, self._sync)
            finally:
                with self._lock:
                    self._young = None
        if garbage and not dry_run:
            # Frees the disk space and drops the tombstones, so that page_count (RocksDB's
            # key estimate) is exact again.
            with self._writing():
                self.cf["pages"].compact_range(None, None)
        return Sweep(stored, len(garbage))

    def control_socket(self) -> Path:
        return control_socket(self.path)

    def close(self) -> None:
        if self.db is not None:
            self._disconnect()

    def format_info(self) -> dict:
        return msgpack.unpackb(self.db[b"format"])

    def map_blob(self, ckpt: int) -> bytes | None:
        return self.cf["maps"].get(_key(ckpt))

    def iter_pages(self) -> Iterator[tuple[bytes, bytes]]:
        return self.cf["pages"].items()

    def page_count(self) -> int:
        # Pages are only ever added once each (dedup), and gc compacts away what it deletes,
        # so RocksDB's count is exact; cheap where a scan reads every page.
        return self.cf["pages"].property_int_value("rocksdb.estimate-num-keys")

    def disk_usage(self) -> dict[str, int]:
        usage = {c: self.cf[c].property_int_value("rocksdb.live-sst-files-size") for c in CFS}
        # The total also counts the write-ahead log, the manifest and the default family.
        usage["total"] = sum(f.stat().st_size for f in self.path.iterdir() if f.is_file())
        return usage
