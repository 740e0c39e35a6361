"""Dropping checkpoints by policy. Every kept checkpoint stays restorable bit-exact: one whose
map chain went through a dropped checkpoint gets its map rewritten as a full map, and one whose
parent is dropped is re-parented to its nearest kept ancestor. Pages are left to gc."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from vmckpt.storage.interface import PageStore


@dataclass
class Policy:
    """What to keep: the union of the policies given."""

    keep_last: int | None = None  # the newest N checkpoints
    keep_every: int | None = None  # checkpoints whose id is a multiple of K
    keep_within: float | None = None  # checkpoints taken less than this many seconds ago
    keep_ids: tuple[int, ...] = ()  # and these (a running engine's parent)
    keep_newest: bool = False  # and the newest (the one a running engine just committed)

    def given(self) -> bool:
        return any(v is not None for v in (self.keep_last, self.keep_every, self.keep_within))


@dataclass
class PruneResult:
    dry_run: bool
    checkpoints: int  # before the prune
    kept: list[int] = field(default_factory=list)
    dropped: list[int] = field(default_factory=list)
    rewritten: list[int] = field(default_factory=list)  # kept; their map becomes a full map
    reparented: list[dict] = field(default_factory=list)  # {"id", "parent", "was"}


def kept_ids(records: list[dict], policy: Policy, now: float) -> set[int]:
    """The ids policy keeps among records (in id order)."""
    ids = [r["id"] for r in records]
    keep = set(policy.keep_ids).intersection(ids)
    if policy.keep_last:
        keep.update(ids[-policy.keep_last:])
    if policy.keep_every:
        # By id, not by position: a prune with the same policy never drops what an earlier
        # one kept.
        keep.update(i for i in ids if i % policy.keep_every == 0)
    if policy.keep_within is not None:
        keep.update(r["id"] for r in records if r["time"] >= now - policy.keep_within)
    if policy.keep_newest and ids:
        keep.add(ids[-1])
    return keep


def prune(store: PageStore, policy: Policy, *, dry_run: bool = False,
          now: float | None = None) -> PruneResult:
    """Drops what policy does not keep, in one atomic write (a crash leaves the store before
    or after it); with dry_run only says what it would do."""
    now = time.time() if now is None else now
    with store.editing():
        records = store.list_checkpoints()
        keep = kept_ids(records, policy, now) | store.held_checkpoints()
        result = PruneResult(dry_run, len(records))
        updates = plan(records, keep, result)
        if not dry_run and result.dropped:
            maps = {}
            for ckpt in result.rewritten:  # read while every chain is still whole
                maps[ckpt] = store.read_map(ckpt).sparse().encode("full")
                updates[ckpt]["map"]["bytes"] = len(maps[ckpt])
            store.replace_checkpoints(result.dropped, list(updates.values()), maps)
    return result


def plan(records: Iterable[dict], keep: set[int], result: PruneResult) -> dict[int, dict]:
    """Fills result in; returns the kept records that change, by id (a rewritten map's bytes
    are set once it is written). Records come in id order: parents are decided first."""
    nearest: dict[int, int | None] = {}  # dropped checkpoint -> its nearest kept ancestor
    depth: dict[int, int] = {}  # kept checkpoint -> its map's depth after the prune
    updates: dict[int, dict] = {}
    for rec in records:
        ckpt, parent = rec["id"], rec.get("parent")
        ancestor = parent if parent is None or parent in keep else nearest.get(parent)
        if ckpt not in keep:
            nearest[ckpt] = ancestor
            result.dropped.append(ckpt)
            continue
        result.kept.append(ckpt)
        new = dict(rec)
        if ancestor != parent:
            new["parent"] = ancestor
            result.reparented.append({"id": ckpt, "parent": ancestor, "was": parent})
        if rec["map"]["kind"] == "delta" and parent not in keep:  # its chain would break
            result.rewritten.append(ckpt)
            new["map"] = {"kind": "full", "depth": 0, "bytes": None}  # bytes: once written
        elif rec["map"]["kind"] == "delta":
            new["map"] = {**rec["map"], "depth": depth[parent] + 1}
        depth[ckpt] = new["map"]["depth"]
        if new != rec:
            updates[ckpt] = new
    return updates
