"""The distributed store: a Redis Cluster (redis-py's RedisCluster), named by a store URL
redis://HOST:PORT[,HOST:PORT...]/NAME[?replicas=N].

Pages are content-addressed and shared by every NAME on the cluster (dedup across VMs), one key
each, written once (SET NX) and spread over the cluster's slots. A NAME's format, records and
maps are hashes in one slot (hash tag {NAME}), so that a commit or a prune is one MULTI/EXEC.
A record is written last: after every page it names is acknowledged by its master (and by N
replicas with ?replicas=N, through WAIT on every master), together with its map.

gc across processes: each writer adds the ids it puts to its own pending set (before it writes
or finds them) and drops the set once a commit names them, unless a gc runs; a gc spares every
pending id, and gives back (SET NX) any page it deleted that a writer took as present meanwhile
(GETDEL, then a second look at the pending sets)."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from urllib.parse import parse_qs, unquote

import msgpack
import numpy as np
import redis
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import RedisClusterException, RedisError
from vmckpt.storage.envelope import BadEnvelope, seal, unseal
from vmckpt.storage.errors import (
    Damaged,
    FormatMismatch,
    MissingPage,
    NotAStore,
    StoreError,
    StoreFull,
    UnknownCheckpoint,
    id_ranges,
)
from vmckpt.storage.interface import PageStore, PutResult, Sweep
from vmckpt.storage.pagemap import ID_BYTES, ZERO_ID, MapDelta, PageMap
from vmckpt.storage.records import decode_record, next_map, read_map

FORMAT = {"name": "vmckpt-store", "version": 2, "page_size": 4096, "hash": "sha256",
          "backend": "redis-cluster"}
SCHEME = "redis://"
PAGE = b"vmckpt:p:"  # + the raw 32-byte id
NAMES = "vmckpt:names"  # every NAME on the cluster: gc marks the pages of all of them
PENDING = "vmckpt:{pending}:"  # + writer id: one slot, so their union is one SUNION
WRITERS = "vmckpt:{pending}:writers"
GC_LOCK = "vmckpt:{pending}:gc"
PENDING_TTL = 3600_000  # ms: a writer that died leaves its pending pages this long
LOCK_TTL = 600_000  # ms: a commit or prune of a process that died holds its NAME this long
BATCH = 512  # keys per pipeline round
WAIT_MS = 10_000
SLOTS = 16384
RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end"


def is_cluster_url(path: object) -> bool:
    # A URL that went through pathlib has lost one slash of "//".
    return str(path).startswith("redis:/")


def parse_url(url: str) -> tuple[list[tuple[str, int]], str, int]:
    """(host, port) list, NAME, replicas; StoreError (one line) if url is not one."""
    text = str(url)
    rest = text[len("redis://"):] if text.startswith(SCHEME) else text[len("redis:/"):]
    where, _, query = rest.partition("?")
    hosts, _, name = where.partition("/")
    name = unquote(name)
    nodes = []
    for part in filter(None, hosts.split(",")):
        host, _, port = part.rpartition(":")
        if not host or not port.isdigit():
            raise StoreError(f"store URL {text}: {part!r} is not HOST:PORT")
        nodes.append((host.strip("[]"), int(port)))
    if not nodes or not name or "/" in name or "{" in name or "}" in name:
        raise StoreError(f"store URL {text} is not redis://HOST:PORT[,HOST:PORT...]/NAME"
                         "[?replicas=N] (NAME without '/', '{' or '}')")
    opts = parse_qs(query)
    if set(opts) - {"replicas"} or not all(v.isdigit() for v in opts.get("replicas", ["0"])):
        raise StoreError(f"store URL {text}: the only option is replicas=N")
    return nodes, name, int(opts.get("replicas", ["0"])[0])


def connect(nodes: list[tuple[str, int]], url: str) -> RedisCluster:
    """The cluster client, or a StoreError in one line: nothing answers, not a cluster, a
    slot no master serves."""
    hosts = ",".join(f"{h}:{p}" for h, p in nodes)
    try:
        rc = RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in nodes],
                          require_full_coverage=False, socket_timeout=10,
                          socket_connect_timeout=3)
    except RedisClusterException as e:
        text = str(e)
        if "not enabled" in text.lower() or "cluster mode" in text.lower():
            raise StoreError(f"store {url}: {hosts} is a Redis server without cluster mode "
                             "(cluster-enabled no); vmckpt needs a Redis Cluster") from None
        raise StoreError(f"store {url}: no Redis Cluster node answers at {hosts}") from None
    except RedisError as e:
        raise StoreError(f"store {url}: no Redis Cluster node answers at {hosts} "
                         f"({e})") from None
    covered = sum(1 for nodes_ in rc.nodes_manager.slots_cache.values() if nodes_)
    if covered < SLOTS:
        rc.close()
        raise StoreError(f"store {url}: the cluster at {hosts} serves {covered} of {SLOTS} "
                         f"hash slots ({SLOTS - covered} have no master); vmckpt needs "
                         "cluster_state:ok")
    for node in rc.get_primaries():
        try:
            state = rc.get_redis_connection(node).execute_command("CLUSTER INFO")
        except RedisError as e:
            rc.close()
            raise StoreError(f"store {url}: master {node.name} does not answer ({e})") from None
        if state.get("cluster_state") != "ok":
            rc.close()
            raise StoreError(f"store {url}: master {node.name} says cluster_state:"
                             f"{state.get('cluster_state')} ({state.get('cluster_slots_ok')} "
                             f"of {SLOTS} hash slots served); vmckpt needs cluster_state:ok")
    return rc


def _key(ckpt: int) -> bytes:
    return ckpt.to_bytes(8, "big")


class ClusterStore(PageStore):
    def __init__(self, url: str, *, create: bool = False, readonly: bool = False,
                 full_every: int = 16, client: RedisCluster | None = None) -> None:
        nodes, self.name, self.replicas = parse_url(url)
        self.path = url if str(url).startswith(SCHEME) else SCHEME + str(url)[len("redis:/"):]
        self.readonly = readonly
        self.rc = client or connect(nodes, self.path)
        self._own_client = client is None
        tag = "vmckpt:{" + self.name + "}:"
        self.k_meta, self.k_records = tag + "meta", tag + "records"
        self.k_maps, self.k_lock, self.k_held = tag + "maps", tag + "lock", tag + "held"
        self.writer = f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.k_pending = PENDING + self.writer
        self._locks = 0  # this object's holds of the NAME's lock (editing, then commit)
        self._token = uuid.uuid4().hex
        self.created = False
        self._committed = False
        meta = self._call(self.rc.hget, self.k_meta, "format")
        if meta is None:
            if readonly or not create:
                self.close()
                raise NotAStore(f"no vmckpt store {self.name} on the cluster at {self.path}")
            fmt = {**FORMAT, "full_every": full_every}
            self.created = bool(self._call(self.rc.hsetnx, self.k_meta, "format",
                                           msgpack.packb(fmt)))
            self._call(self.rc.sadd, NAMES, self.name)
            meta = self._call(self.rc.hget, self.k_meta, "format")
        fmt = msgpack.unpackb(meta)
        if fmt.get("name") != FORMAT["name"] or fmt.get("version") != FORMAT["version"]:
            self.close()
            raise FormatMismatch(f"{self.path} is a store of format {fmt.get('name')} "
                                 f"v{fmt.get('version')}; this vmckpt reads v2")
        self.full_every = int(fmt["full_every"])

    # ---------------------------------------------------------------- plumbing

    def _call(self, fn: Callable, *args: object, **kw: object):
        """One cluster call; a node that does not answer or a cluster that is down is a
        StoreFull naming what failed (the engine keeps the guest running and retries)."""
        try:
            return fn(*args, **kw)
        except (RedisError, RedisClusterException, OSError) as e:
            raise StoreFull(f"store {self.path} cannot be written: the cluster failed "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                            ) from None

    def _pipe(self, build: Callable[[object], None]) -> list:
        pipe = self.rc.pipeline(transaction=False)
        build(pipe)
        return self._call(pipe.execute)

    def _slot_client(self, key: str) -> redis.Redis:
        """A plain client of the master that serves key: for MULTI/EXEC within one slot."""
        return self.rc.get_redis_connection(self.rc.get_node_from_key(key))

    def _transaction(self, build: Callable[[object], None]) -> list:
        def run() -> list:
            pipe = self._slot_client(self.k_meta).pipeline(transaction=True)
            build(pipe)
            return pipe.execute()
        return self._call(run)

    def _replicated(self) -> None:
        """With ?replicas=N: every master's writes so far reached N of its replicas (WAIT
        after a write on the same connection covers everything written before it)."""
        if not self.replicas:
            return
        for node in self._call(self.rc.get_primaries):
            key = self._key_on(node)
            conn = self.rc.get_redis_connection(node)
            pipe = conn.pipeline(transaction=False)
            pipe.set(key, self.writer, px=60_000)
            pipe.execute_command("WAIT", self.replicas, WAIT_MS)
            got = self._call(pipe.execute)[1]
            if got < self.replicas:
                raise StoreFull(f"store {self.path} cannot take more: {got} of "
                                f"{self.replicas} replicas of {node.name} acknowledged "
                                f"within {WAIT_MS // 1000} s")

    def _key_on(self, node: ClusterNode) -> str:
        slots = self.rc.nodes_manager.slots_cache
        for i in range(100_000):
            key = f"vmckpt:wait:{{{i}}}"
            owners = slots.get(self.rc.keyslot(key))
            if owners and owners[0].name == node.name:
                return key
        raise StoreError(f"store {self.path}: master {node.name} serves no slot")

    @contextmanager
    def _name_lock(self) -> Iterator[None]:
        """The NAME's lock across processes: one commit or prune at a time."""
        if self._locks:
            self._locks += 1
            try:
                yield
            finally:
                self._locks -= 1
            return
        while not self._call(self.rc.set, self.k_lock, self._token, nx=True, px=LOCK_TTL):
            time.sleep(0.02)
        self._locks = 1
        try:
            yield
        finally:
            self._locks = 0
            with suppress(StoreFull):
                self._call(self.rc.eval, RELEASE, 1, self.k_lock, self._token)

    # ---------------------------------------------------------------- pages

    @staticmethod
    def _page_keys(ids: np.ndarray) -> list[bytes]:
        raw = np.ascontiguousarray(ids, np.uint8).tobytes()
        return [PAGE + raw[i:i + ID_BYTES] for i in range(0, len(raw), ID_BYTES)]

    def put_pages(self, ids: np.ndarray, pages: np.ndarray) -> PutResult:
        keys = self._page_keys(ids)
        raw = memoryview(np.ascontiguousarray(pages)).cast("B")
        size = self.page_size
        rows = [i for i, k in enumerate(keys) if k[len(PAGE):] != ZERO_ID]
        if not rows:
            return PutResult(0, 0, 0)

        def pend(p) -> None:  # before the pages are looked at: a gc from now on spares them
            p.sadd(self.k_pending, *{keys[i][len(PAGE):] for i in rows})
            p.pexpire(self.k_pending, PENDING_TTL)
            p.sadd(WRITERS, self.writer)
        self._transaction_free(pend)
        new = 0
        for start in range(0, len(rows), BATCH):
            chunk = rows[start:start + BATCH]
            done = self._pipe(lambda p, c=chunk: [
                p.set(keys[i], raw[i * size:(i + 1) * size].tobytes(), nx=True) for i in c])
            new += sum(1 for ok in done if ok)
        return PutResult(new, len(rows) - new, new * size)

    def _transaction_free(self, build: Callable[[object], None]) -> None:
        """Commands on the pending slot in one round trip (they share its hash tag)."""
        def run() -> None:
            pipe = self._slot_client(WRITERS).pipeline(transaction=False)
            build(pipe)
            pipe.execute()
        self._call(run)

    def has_pages(self, ids: np.ndarray) -> np.ndarray:
        keys = self._page_keys(ids)
        out: list[bool] = []
        for start in range(0, len(keys), BATCH * 4):
            out += self._pipe(lambda p, c=keys[start:start + BATCH * 4]: [p.exists(k)
                                                                             for k in c])
        return np.array([bool(x) for x in out], bool)

    def fetch_pages(self, ids: Sequence[bytes]) -> list[bytes | None | Damaged]:
        keys = [PAGE + bytes(pid) for pid in ids]
        out: list = []
        for start in range(0, len(keys), BATCH):
            out += self._pipe(lambda p, c=keys[start:start + BATCH]: [p.get(k) for k in c])
        return out

    def get_pages(self, ids: Sequence[bytes]) -> list[bytes]:
        got = self.fetch_pages(ids)
        for pid, page in zip(ids, got, strict=True):
            if page is None:
                raise MissingPage(f"page {bytes(pid).hex()} is missing from {self.path}")
        return got

    def _page_scan(self) -> Iterator[tuple[redis.Redis, list[bytes]]]:
        """Every stored page key, by master, in batches."""
        for node in self._call(self.rc.get_primaries):
            conn = self.rc.get_redis_connection(node)
            batch: list[bytes] = []
            for key in self._call(lambda c=conn: list(c.scan_iter(match=PAGE + b"*",
                                                                  count=1000))):
                batch.append(key)
                if len(batch) == BATCH:
                    yield conn, batch
                    batch = []
            if batch:
                yield conn, batch

    def iter_pages(self) -> Iterator[tuple[bytes, bytes]]:
        for conn, keys in self._page_scan():
            pipe = conn.pipeline(transaction=False)
            for k in keys:
                pipe.get(k)
            for k, v in zip(keys, self._call(pipe.execute), strict=True):
                if v is not None:  # deleted by a gc since the scan
                    yield k[len(PAGE):], v

    def page_count(self) -> int:
        return sum(len(keys) for _, keys in self._page_scan())

    # ---------------------------------------------------------------- records and maps

    def _unseal(self, blob: bytes, what: str, ckpt: int) -> bytes:
        try:
            return unseal(blob)
        except BadEnvelope as e:
            raise Damaged(self.path, f"{what} {e}", (ckpt,)) from None

    def _newest(self) -> int:
        return max((int.from_bytes(k, "big") for k in self._call(self.rc.hkeys,
                                                                 self.k_records)), default=0)

    def get_record(self, ckpt: int | str) -> dict:
        if ckpt == "latest":
            ckpt = self._newest()
            if not ckpt:
                raise UnknownCheckpoint(f"store {self.path} holds no checkpoint")
        blob = self._call(self.rc.hget, self.k_records, _key(ckpt)) \
            if isinstance(ckpt, int) else None
        if blob is None:
            raise UnknownCheckpoint(f"no checkpoint {ckpt} in {self.path}")
        return decode_record(self, ckpt, self._unseal(
            blob, f"the record of checkpoint {ckpt}", ckpt))

    def read_records(self) -> tuple[list[dict], dict[int, str]]:
        good, bad = [], {}
        stored = self._call(self.rc.hgetall, self.k_records)
        for key in sorted(stored):
            ckpt = int.from_bytes(key, "big")
            try:
                good.append(decode_record(self, ckpt, self._unseal(
                    stored[key], f"the record of checkpoint {ckpt}", ckpt)))
            except Damaged as e:
                bad[ckpt] = e.what.split(f"the record of checkpoint {ckpt} ", 1)[-1]
        return good, bad

    def list_checkpoints(self) -> list[dict]:
        records, bad = self.read_records()
        if bad:
            raise Damaged(self.path, f"the records of checkpoints {id_ranges(bad)} do not "
                          "read back", tuple(sorted(bad)))
        return records

    def map_blob(self, ckpt: int, *, must: bool = False) -> bytes | None:
        blob = self._call(self.rc.hget, self.k_maps, _key(ckpt))
        if blob is None:
            if must:
                raise Damaged(self.path, f"checkpoint {ckpt} has no map", (ckpt,))
            return None
        return self._unseal(blob, f"the map of checkpoint {ckpt}", ckpt)

    def read_map(self, ckpt: int | str) -> PageMap:
        return read_map(self, ckpt)

    def commit_checkpoint(self, record: dict, delta: MapDelta) -> int:
        self._replicated()  # the pages first (each put was acknowledged by its master)
        with self._name_lock():  # a prune may not change the parent's chain under us
            entry, blob = next_map(self, record, delta)
            ckpt = int(self._call(self.rc.hincrby, self.k_meta, "high", 1))
            record = {**record, "id": ckpt, "map": entry}

            def write(p) -> None:  # map and record in one MULTI/EXEC: visible together
                p.hset(self.k_maps, _key(ckpt), seal(blob))
                p.hset(self.k_records, _key(ckpt), seal(msgpack.packb(record)))
                p.hset(self.k_held, self.writer, ckpt)  # the parent of this writer's next
            self._transaction(write)
            self._replicated()
            self._committed = True
        if not self._call(self.rc.exists, GC_LOCK):
            self._call(self.rc.delete, self.k_pending)  # a record names them now
        return ckpt

    def held_checkpoints(self) -> set[int]:
        """Checkpoints writers of this NAME continue from (each one's last commit): prune
        keeps them, as it keeps a running engine's parent."""
        return {int(v) for v in self._call(self.rc.hvals, self.k_held)}

    @contextmanager
    def editing(self) -> Iterator[None]:
        with self._name_lock():
            yield

    def replace_checkpoints(self, drop: Sequence[int], records: Sequence[dict],
                            maps: dict[int, bytes]) -> None:
        def write(p) -> None:
            if drop:
                p.hdel(self.k_records, *(_key(c) for c in drop))
                p.hdel(self.k_maps, *(_key(c) for c in drop))
            for rec in records:
                p.hset(self.k_records, _key(rec["id"]), seal(msgpack.packb(rec)))
            for ckpt, blob in maps.items():
                p.hset(self.k_maps, _key(ckpt), seal(blob))
        with self._name_lock():
            self._transaction(write)
            self._replicated()

    def sweep(self, mark: Callable[[], set[bytes]], *, dry_run: bool = False) -> Sweep:
        from vmckpt.storage.gc import referenced  # gc builds on this module's interface

        token = uuid.uuid4().hex
        while not self._call(self.rc.set, GC_LOCK, token, nx=True, px=LOCK_TTL):
            time.sleep(0.05)
        try:
            live = self._pending() | mark()
            for name in self._call(self.rc.smembers, NAMES):
                name = name.decode()
                if name != self.name:  # pages are shared: every NAME's checkpoints hold them
                    other = ClusterStore(f"{SCHEME}x:0/{name}", readonly=True, client=self.rc)
                    live |= referenced(other)
            stored = freed = 0
            for conn, keys in self._page_scan():
                stored += len(keys)
                garbage = [k for k in keys if k[len(PAGE):] not in live]
                if garbage:  # put since the mark began: pending now
                    pending = self._pending()
                    garbage = [k for k in garbage if k[len(PAGE):] not in pending]
                if garbage and not dry_run:
                    freed += self._delete(conn, garbage)
                else:
                    freed += len(garbage)
        finally:
            with suppress(StoreFull):
                self._call(self.rc.eval, RELEASE, 1, GC_LOCK, token)
        return Sweep(stored, freed)

    def _delete(self, conn: redis.Redis, keys: list[bytes]) -> int:
        """Deletes keys; gives back any that a writer put (found present) meanwhile. Returns
        how many stay deleted."""
        pipe = conn.pipeline(transaction=False)
        for k in keys:
            pipe.getdel(k)
        values = self._call(pipe.execute)
        pending = self._pending()
        back = [(k, v) for k, v in zip(keys, values, strict=True)
                if v is not None and k[len(PAGE):] in pending]
        if back:
            pipe = conn.pipeline(transaction=False)
            for k, v in back:
                pipe.set(k, v, nx=True)
            self._call(pipe.execute)
        return sum(v is not None for v in values) - len(back)

    def _pending(self) -> set[bytes]:
        writers = self._call(self.rc.smembers, WRITERS)
        keys = [PENDING + w.decode() for w in writers]
        if not keys:
            return set()
        return set(self._call(self._slot_client(WRITERS).sunion, keys))

    # ---------------------------------------------------------------- the rest

    def format_info(self) -> dict:
        return msgpack.unpackb(self._call(self.rc.hget, self.k_meta, "format"))

    def disk_usage(self) -> dict[str, int]:
        """Server memory, not disk: the masters' used_memory ("total"), what this NAME's
        records and maps take, and the rest ("pages", shared by every NAME)."""
        usage = {"records": int(self._call(self.rc.memory_usage, self.k_records) or 0),
                 "maps": int(self._call(self.rc.memory_usage, self.k_maps) or 0)}
        total = 0
        for node in self._call(self.rc.get_primaries):
            info = self._call(self.rc.get_redis_connection(node).info, "memory")
            total += int(info["used_memory"])
        usage["total"] = total
        usage["pages"] = max(0, total - usage["records"] - usage["maps"])
        return usage

    def recover(self) -> bool:
        try:
            self.rc.nodes_manager.initialize()
            info = self.rc.cluster_info()
        except (RedisError, RedisClusterException, OSError):
            return False
        return info.get("cluster_state") == "ok"

    def discard_if_unused(self) -> None:
        if self.created and not self._committed and not self._newest():
            self._call(self.rc.delete, self.k_meta)
            self._call(self.rc.srem, NAMES, self.name)
        self.close()

    def close(self) -> None:
        if getattr(self, "rc", None) is None:
            return
        if not self.readonly:
            with suppress(StoreFull, AttributeError):  # this writer's pages in flight go
                self._transaction_free(lambda p: (p.delete(self.k_pending),
                                                  p.srem(WRITERS, self.writer)))
                self._call(self.rc.hdel, self.k_held, self.writer)
        if self._own_client:
            with suppress(Exception):
                self.rc.close()
        self.rc = None
