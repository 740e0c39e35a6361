"""The embedded store: RocksDB (rocksdict) with pages, records and maps in column families."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

import msgpack
import numpy as np
from rocksdict import (
    AccessType,
    BlockBasedOptions,
    Cache,
    DBCompressionType,
    Options,
    Rdict,
    ReadOptions,
    WriteBatch,
    WriteBufferManager,
    WriteOptions,
)
from vmckpt.storage.envelope import BadEnvelope, seal, unseal
from vmckpt.storage.errors import (
    REPAIR_HINT,
    Damaged,
    FormatMismatch,
    MissingPage,
    NotAStore,
    StoreError,
    StoreFull,
    StoreLocked,
    UnknownCheckpoint,
    id_ranges,
)
from vmckpt.storage.interface import PageStore, PutResult, Sweep
from vmckpt.storage.pagemap import ID_BYTES, ZERO_ID, MapDelta, PageMap
from vmckpt.storage.private import private_dir, private_files
from vmckpt.storage.records import decode_record, next_map, read_map

# v2: records and maps sealed with their length and CRC-32 (storage/envelope.py). v1 stores
# are read and written as they are, and say in `vmckpt check` that they carry no checksum.
FORMAT = {"name": "vmckpt-store", "version": 2, "page_size": 4096, "hash": "sha256"}
READS = (1, 2)
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
MARKER = "VMCKPT-STORE"  # says "a vmckpt store" before RocksDB is asked anything
REBUILD_HINT = "`vmckpt check --repair` rebuilds it from its table files"
ID_KEY = 8  # bytes of a record's or map's key: records and maps are the families keyed so


def control_socket(path: str | Path) -> Path:
    """Where an engine holding the store at path answers maintenance requests."""
    return Path(path) / CONTROL_SOCKET


def _key(ckpt: int) -> bytes:
    return ckpt.to_bytes(ID_KEY, "big")


# RocksDB's memory, whatever the store's size or the run's length: memtables of every family
# share one budget (writers stall on a flush past it) that is charged to one block cache,
# which also holds the table files' index and filter blocks (held outside any cache by
# default, they grow with the store).
ROCKS_MEMORY = 128 << 20  # the block cache, memtables included
MEMTABLES = 96 << 20  # of which memtables at most (smaller ingested a third slower)
MEMTABLE = 32 << 20  # one memtable: a flush writes a table file about this size


class Budget:
    """One open's memory: the database and every family are given the same one."""

    def __init__(self) -> None:
        self.cache = Cache(ROCKS_MEMORY)
        self.writes = WriteBufferManager.new_write_buffer_manager_with_cache(
            MEMTABLES, True, self.cache)


def _options(*, paranoid: bool = True, budget: Budget | None = None) -> Options:
    """Options for the database or one family; an open gives them all one Budget."""
    budget = budget or Budget()
    opts = Options(raw_mode=True)
    opts.create_if_missing(True)
    opts.create_missing_column_families(True)
    # Off only for readers: a damaged store still opens, so that what is intact can be read
    # and `vmckpt check` can say what is not. Reads verify block checksums either way.
    opts.set_paranoid_checks(paranoid)
    opts.set_write_buffer_size(MEMTABLE)
    opts.set_max_write_buffer_number(4)
    opts.set_write_buffer_manager(budget.writes)
    opts.increase_parallelism(2)
    opts.set_compression_type(DBCompressionType.lz4())
    table = BlockBasedOptions()
    table.set_bloom_filter(10, False)  # absent-page checks stay off the disk
    table.set_block_cache(budget.cache)
    table.set_cache_index_and_filter_blocks(True)
    table.set_pin_l0_filter_and_index_blocks_in_cache(True)
    opts.set_block_based_table_factory(table)
    return opts


def rocks_reason(error: Exception) -> str:
    """A RocksDB error as the end of a sentence ("is unreadable (...)"), without the paths and
    numbers that only RocksDB's developers read."""
    text = str(error).strip()
    if m := re.search(r"block checksum mismatch.*?in \S*?([^/\s]+\.sst)", text):
        return f"block checksum mismatch in table file {m[1]}"
    if m := re.search(r"Sst file size mismatch: \S*?([^/\s]+\.sst)\. Expected (\d+), actual "
                      r"size (\d+)", text):
        return f"table file {m[1]} is {m[3]} bytes where the manifest says {m[2]} (truncated)"
    if m := re.search(r"/([^/\s]+): No such file or directory", text):
        return f"its file {m[1]} is missing"
    return text.splitlines()[0] if text else type(error).__name__


def is_damage(error: Exception) -> bool:
    text = str(error)
    return text.startswith(("Corruption", "IO error")) or "checksum" in text


def shadow_of(path: Path) -> Path:
    """A private directory of links to the store's files, for RocksDB to open read-only: the
    library (rocksdict) writes a config file into whatever directory it opens, and a reader
    must never write into a store (it may not be allowed to, or it may not be a store)."""
    shadow = Path(tempfile.mkdtemp(prefix="vmckpt-read-"))
    for entry in os.scandir(path):
        if entry.is_file() and entry.name not in ("rocksdict-config.json", "LOCK"):
            os.symlink(os.path.abspath(entry.path), shadow / entry.name)
    return shadow


def looks_like_store(path: Path) -> bool:
    """A vmckpt store by its files alone, RocksDB not asked: the marker, or (stores made
    before it) RocksDB options that name the store's column families."""
    if (path / MARKER).exists():
        return True
    for options in path.glob("OPTIONS-*"):
        try:
            text = options.read_text(errors="replace")
        except OSError:
            continue
        if all(f'[CFOptions "{c}"]' in text for c in CFS):
            return True
    return False


def identify(path: Path) -> None:
    """Raises unless path (not empty) holds a vmckpt store; writes nothing, so that a foreign
    directory, another program's RocksDB included, is refused as it was found."""
    vmckpt = looks_like_store(path)
    if not (path / "CURRENT").exists():
        if vmckpt:
            raise Damaged(path, "its file CURRENT is missing", hint=REBUILD_HINT)
        raise NotAStore(f"{path} is not a vmckpt store (and not empty)")
    try:
        families = Rdict.list_cf(str(path), Options(raw_mode=True))
    except Exception as e:
        if vmckpt:
            raise Damaged(path, rocks_reason(e), hint=REBUILD_HINT) from None
        raise NotAStore(f"{path} is not a vmckpt store ({rocks_reason(e)})") from None
    if not set(CFS) <= set(families):
        raise NotAStore(f"{path} is a RocksDB database but not a vmckpt store")


class RocksStore(PageStore):
    def __init__(self, path: str | Path, *, create: bool = False, readonly: bool = False,
                 full_every: int = 16) -> None:
        self.path = Path(path)
        self.db = None
        self._shadow: Path | None = None
        self.cf: dict[str, Rdict] = {}
        self.readonly = readonly
        if self.path.exists() and not self.path.is_dir():
            raise NotAStore(f"{self.path} is a file, not a vmckpt store")
        fresh = not self.path.exists() or not any(self.path.iterdir())
        if fresh and (readonly or not create):
            raise NotAStore(f"no vmckpt store at {self.path}")
        # Made here (so discard_if_unused may take it away again): the directory, or only
        # what is in it.
        self.created: str | None = None
        if fresh:
            self.created = "dir" if private_dir(self.path) else "contents"
        else:
            identify(self.path)
            if not readonly:
                self._probe_format()  # before the first write: no vmckpt store, no write
        self._connect(readonly, fresh)
        meta = self._read(self.db, b"format", "its format record")
        if meta is None:
            if not fresh:
                self.close()
                raise NotAStore(f"{self.path} is a RocksDB database but not a vmckpt store")
            self.db[b"format"] = msgpack.packb({**FORMAT, "full_every": full_every})
            meta = self.db.get(b"format")
        fmt = msgpack.unpackb(meta)
        if fmt.get("name") != FORMAT["name"] or fmt.get("version") not in READS:
            self.close()
            raise FormatMismatch(f"{self.path} is a store of format {fmt.get('name')} "
                                 f"v{fmt.get('version')}; this vmckpt reads "
                                 + " and ".join(f"v{v}" for v in READS))
        self.version = int(fmt["version"])
        self.full_every = int(fmt["full_every"])
        if not readonly:
            (self.path / MARKER).write_text(f"{FORMAT['name']} v{self.version}\n")
            os.chmod(self.path, 0o700)  # a store made before vmckpt made them private
            private_files(self.path)
        self._lock = threading.Lock()  # the pages: puts (their dedup lookups), a sweep
        self._commits = threading.RLock()  # commits and edits of records and maps
        self._maintenance = threading.Lock()  # one prune or gc at a time
        # Page ids put (new or dup) since the last commit, and while a sweep runs every id
        # put: pages of a checkpoint in flight, which no record names yet.
        self._uncommitted: set[bytes] = set()
        self._young: set[bytes] | None = None
        self._last = self._newest()
        last_id = self._read(self.db, LAST_ID, "its highest checkpoint id") or b""
        self._high = max(self._last, int.from_bytes(last_id, "big"))
        if not readonly and self.damaged_records():
            # Ids and parents come from the records: a writer must not guess them.
            self.close()
            raise Damaged(self.path, "the records of its newest checkpoints cannot be read")
        self._sync = WriteOptions()
        self._sync.sync = True
        self._nowal = WriteOptions()
        self._nowal.disable_wal = True

    def _probe_format(self) -> None:
        """A read-only look at the format record, so that a RocksDB of another program is
        refused before it is opened for writing (which adds families, rotates its LOG)."""
        probe, shadow = self._open(True)
        try:
            meta = probe.get(b"format")
        except Exception:
            meta = b""  # damaged: the read-write open says how
        finally:
            probe.close()
            shutil.rmtree(shadow, ignore_errors=True)
        if meta is None:
            raise NotAStore(f"{self.path} is a RocksDB database but not a vmckpt store")

    def _open(self, readonly: bool, fresh: bool = False) -> tuple[Rdict, Path | None]:
        """The database, and for a read-only open the shadow directory it was opened through
        (see shadow_of)."""
        access = AccessType.read_only() if readonly else AccessType.read_write()
        attempts = OPEN_ATTEMPTS if readonly else 1
        while True:
            budget = Budget()
            opts = _options(paranoid=not readonly, budget=budget)
            if not fresh:
                opts.create_if_missing(False)
            shadow = shadow_of(self.path) if readonly else None
            try:
                return Rdict(str(shadow or self.path), opts,
                             column_families={c: _options(paranoid=not readonly, budget=budget)
                                              for c in CFS},
                             access_type=access), shadow
            except Exception as e:
                if shadow is not None:
                    shutil.rmtree(shadow, ignore_errors=True)
                text = str(e).replace(str(shadow), str(self.path)) if shadow else str(e)
                if "lock" in text.lower():
                    raise StoreLocked(f"store {self.path} is locked by another process "
                                      "(a running engine?)") from None
                # A reader races the writer's compactions (gc runs one): a table file the
                # manifest it read names may be gone by the time it opens it. Read again.
                attempts -= 1
                if "No such file" in text and attempts:
                    continue
                if is_damage(e):
                    raise Damaged(self.path, rocks_reason(Exception(text))) from None
                raise StoreError(f"cannot open store {self.path}: {text}") from None

    # Every read of the store goes through these: damage becomes Damaged, in one line.

    def _read(self, cf: Rdict, key: bytes, what: str, ckpt: int | None = None) -> bytes | None:
        try:
            return cf.get(key)
        except Exception as e:
            if not is_damage(e):
                raise
            raise Damaged(self.path, f"{what} is unreadable ({rocks_reason(e)})",
                          () if ckpt is None else (ckpt,)) from None

    def _unseal(self, blob: bytes, what: str, ckpt: int) -> bytes:
        if self.version < 2:
            return blob
        try:
            return unseal(blob)
        except BadEnvelope as e:
            raise Damaged(self.path, f"{what} {e}", (ckpt,)) from None

    def _seal(self, payload: bytes) -> bytes:
        return seal(payload) if self.version >= 2 else payload

    def _ids(self, family: str) -> Iterator[tuple[int, bytes | Exception]]:
        """Every (id, value) of the records or maps, in id order; where a table cannot be
        read, (id, the error) for each id it may hold. RocksDB's own iteration just ends at a
        bad block (which once hid every later checkpoint): past one, each id up to the
        highest any table or the default family knows is asked for on its own."""
        cf = self.cf[family]
        it = cf.iter()
        it.seek_to_first()
        last, probed = 0, False
        while True:
            while it.valid():
                last = int.from_bytes(it.key(), "big")
                yield last, it.value()
                it.next()
            try:
                it.status()
                return
            except Exception as e:
                if not is_damage(e) and not probed:
                    raise
            if probed:  # past every id a table knows, and still unreadable: nothing more
                return
            top = max(last, self._top_id())
            for ckpt in range(last + 1, top + 1):
                try:
                    value = cf.get(_key(ckpt))
                except Exception as e:
                    if not is_damage(e):
                        raise
                    yield ckpt, e
                    continue
                if value is not None:
                    yield ckpt, value
            it = cf.iter()
            it.seek(_key(top + 1))  # what only the memtable holds
            last, probed = top, True

    def _top_id(self, *, family_only: bool = False) -> int:
        """The highest checkpoint id the table files' key ranges (those of records and maps)
        and, unless family_only, the highest id given out know."""
        top = max((int.from_bytes(f["end_key"], "big") for f in self.db.live_files()
                   if len(f["end_key"]) == ID_KEY), default=0)
        if family_only:
            return top
        try:
            top = max(top, int.from_bytes(self.db.get(LAST_ID) or b"", "big"))
        except Exception as e:
            if not is_damage(e):
                raise
        return top

    def _newest(self) -> int:
        """The newest checkpoint's id: the last record, unless a table file knows a higher id
        than it (the newest records unreadable): then every id is asked for."""
        it = self.cf["records"].iter()
        it.seek_to_last()
        if it.valid() and int.from_bytes(it.key(), "big") >= self._top_id(family_only=True):
            return int.from_bytes(it.key(), "big")
        try:
            it.status()
        except Exception as e:
            if not is_damage(e):
                raise
        return max((ckpt for ckpt, _ in self._ids("records")), default=0)

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

    def _connect(self, readonly: bool, fresh: bool = False) -> None:
        self.db, self._shadow = self._open(readonly, fresh)
        reads = ReadOptions()
        reads.set_verify_checksums(True)  # RocksDB's default, stated: every block read is checked
        self.db.set_read_options(reads)
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

    def has_pages(self, ids: np.ndarray) -> np.ndarray:
        raw = np.ascontiguousarray(ids).tobytes()
        pids = [raw[i:i + ID_BYTES] for i in range(0, len(raw), ID_BYTES)]
        return np.array([page is not None for page in self._lookup(pids)], bool)

    def get_pages(self, ids: Sequence[bytes]) -> list[bytes]:
        try:
            got = self.cf["pages"].get(list(ids))
        except Exception as e:
            if not is_damage(e):
                raise
            # One bad block fails the whole multi-get: find the page it holds.
            got = [self._read(self.cf["pages"], pid, f"page {pid.hex()}") for pid in ids]
        for pid, page in zip(ids, got, strict=True):
            if page is None:
                raise MissingPage(f"page {pid.hex()} is missing from {self.path}")
        return got

    def fetch_pages(self, ids: Sequence[bytes]) -> list[bytes | None | Damaged]:
        try:
            return self.cf["pages"].get(list(ids))
        except Exception as e:
            if not is_damage(e):
                raise
        out: list[bytes | None | Damaged] = []
        for pid in ids:
            try:
                out.append(self._read(self.cf["pages"], pid, f"page {pid.hex()}"))
            except Damaged as e:
                out.append(e)
        return out

    def _resolve(self, ckpt: int | str) -> int:
        if ckpt == "latest":
            if not self._last:
                raise UnknownCheckpoint(f"store {self.path} holds no checkpoint")
            return self._last
        if not isinstance(ckpt, int) or self._record_blob(ckpt) is None:
            raise UnknownCheckpoint(f"no checkpoint {ckpt} in {self.path}")
        return ckpt

    def _record_blob(self, ckpt: int) -> bytes | None:
        return self._read(self.cf["records"], _key(ckpt), f"the record of checkpoint {ckpt}",
                          ckpt)

    def _record(self, ckpt: int, blob: bytes) -> dict:
        return decode_record(self, ckpt, self._unseal(blob, f"the record of checkpoint {ckpt}",
                                                      ckpt))

    def get_record(self, ckpt: int | str) -> dict:
        ckpt = self._resolve(ckpt)
        return self._record(ckpt, self._record_blob(ckpt))

    def read_records(self) -> tuple[list[dict], dict[int, str]]:
        """Every record that reads back whole, and what is wrong with each other one, by id
        ("is unreadable (...)"). An id whose record is unreadable but whose map reads back
        absent was pruned."""
        good, bad = [], {}
        for ckpt, value in self._ids("records"):
            if isinstance(value, Exception):
                try:
                    if self.cf["maps"].get(_key(ckpt)) is None:
                        continue
                except Exception:  # noqa: S110 (then both are unreadable: damaged)
                    pass
                bad[ckpt] = f"is unreadable ({rocks_reason(value)})"
                continue
            try:
                good.append(self._record(ckpt, value))
            except Damaged as e:
                bad[ckpt] = str(e).split(f"the record of checkpoint {ckpt} ", 1)[1].rsplit(
                    f"; {REPAIR_HINT}", 1)[0]
        return good, bad

    def damaged_records(self) -> dict[int, str]:
        """The ids above the newest readable record whose records do not read back (cheap:
        only the end of the records is read)."""
        if not self._last:
            return {}
        try:
            self.get_record(self._last)
            return {}
        except Damaged:
            return self.read_records()[1]

    def list_checkpoints(self) -> list[dict]:
        records, bad = self.read_records()
        if bad:
            ckpts = sorted(bad)
            why = bad[ckpts[0]]
            which = (f"the record of checkpoint {ckpts[0]} {why}" if len(ckpts) == 1 else
                     f"the records of checkpoints {id_ranges(ckpts)} "
                     + why.replace("is ", "are ", 1).replace("does ", "do ", 1))
            raise Damaged(self.path, which, tuple(ckpts))
        return records

    def read_map(self, ckpt: int | str) -> PageMap:
        return read_map(self, ckpt)

    def commit_checkpoint(self, record: dict, delta: MapDelta) -> int:
        with self._commits:  # a prune may not change the parent's chain under us
            entry, blob = next_map(self, record, delta)
            with self._lock, self._writing():
                self.cf["pages"].flush()  # the pages this record names are on disk before it
                ckpt = self._high + 1
                record = {**record, "id": ckpt, "map": entry}
                batch = WriteBatch(raw_mode=True)
                batch.put(_key(ckpt), self._seal(blob), self.cfh["maps"])
                batch.put(_key(ckpt), self._seal(msgpack.packb(record)), self.cfh["records"])
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
            batch.put(_key(rec["id"]), self._seal(msgpack.packb(rec)), self.cfh["records"])
        for ckpt, blob in maps.items():
            batch.put(_key(ckpt), self._seal(blob), self.cfh["maps"])
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
            if self._shadow is not None:
                shutil.rmtree(self._shadow, ignore_errors=True)
            if not self.readonly:
                private_files(self.path)  # the files RocksDB made while it was open

    def flush(self) -> None:
        """Everything written so far into table files (pages are written without a WAL)."""
        for cf in self.cf.values():
            cf.flush()
        self.db.flush()

    def reserve_ids(self, high: int) -> None:
        """Ids up to high are never given out (a repaired store keeps its ids unique)."""
        self._high = max(self._high, high)

    def truncated_tables(self) -> list[str]:
        """Table files shorter (or longer) than the manifest says, each said as a reason."""
        out = []
        for f in self.db.live_files():
            path = self.path / f["name"].lstrip("/")
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                out.append(f"table file {path.name} is missing")
                continue
            if size != f["size"]:
                out.append(f"table file {path.name} is {size} bytes where the manifest says "
                           f"{f['size']} (truncated)")
        return out

    def discard_if_unused(self) -> None:
        """Closes the store, and if this open created it and no checkpoint was committed,
        takes it away again: a run refused before it started leaves nothing behind."""
        unused = self.created and not self._high and self.db is not None
        self.close()
        if not unused:
            return
        if self.created == "dir":
            shutil.rmtree(self.path, ignore_errors=True)
        else:
            for entry in self.path.iterdir():
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)

    def format_info(self) -> dict:
        return msgpack.unpackb(self.db[b"format"])

    def map_blob(self, ckpt: int, *, must: bool = False) -> bytes | None:
        blob = self._read(self.cf["maps"], _key(ckpt), f"the map of checkpoint {ckpt}", ckpt)
        if blob is None:
            if must:
                raise Damaged(self.path, f"checkpoint {ckpt} has no map", (ckpt,))
            return None
        return self._unseal(blob, f"the map of checkpoint {ckpt}", ckpt)

    def iter_pages(self) -> Iterator[tuple[bytes, bytes]]:
        it = self.cf["pages"].iter()
        it.seek_to_first()
        while it.valid():
            yield it.key(), it.value()
            it.next()
        try:
            it.status()  # RocksDB's iteration ends at a bad block as if at the end
        except Exception as e:
            if not is_damage(e):
                raise
            raise Damaged(self.path, f"its stored pages cannot all be read "
                                     f"({rocks_reason(e)})") from None

    def page_count(self) -> int:
        # Pages are only ever added once each (dedup), and gc compacts away what it deletes,
        # so RocksDB's count is exact; cheap where a scan reads every page.
        return self.cf["pages"].property_int_value("rocksdb.estimate-num-keys")

    def disk_usage(self) -> dict[str, int]:
        usage = {c: self.cf[c].property_int_value("rocksdb.live-sst-files-size") for c in CFS}
        # The total also counts the write-ahead log, the manifest and the default family.
        usage["total"] = sum(f.stat().st_size for f in self.path.iterdir() if f.is_file())
        return usage
