"""Target 1: every checkpoint restores to exactly the guest RAM at its pause instant."""

from __future__ import annotations

import pytest
from conftest import run_with_references
from vmckpt.engine.cycle import EngineOptions
from vmckpt.engine.synthguest import command as synth
from vmckpt.storage import open_store, restore_image


def check_all(store_path, refs, tmp_path) -> None:
    with open_store(store_path, readonly=True) as store:
        records = store.list_checkpoints()
        assert len(records) == len(refs)
        for rec, ref in zip(records, refs, strict=True):
            image = tmp_path / "img"
            restore_image(store, rec["id"], image)
            got = image.read_bytes()
            assert got == ref, f"checkpoint {rec['id']} differs from guest RAM at its pause"


def test_consistency_random_writes_racing_the_copiers(tmp_path):
    # Fast, mixed writes (partial, duplicate, zero, fresh pages in never-touched holes) while
    # one copier with a small buffer drains: guest writes race the copiers and take the
    # copy-on-write path.
    store = tmp_path / "store"
    refs = run_with_references(
        store, synth("--size", "32M", "--fill", "0.3", "--rate", "0", "--pattern", "uniform",
                     "--dup", "0.2", "--zero", "0.1", "--partial", "0.4", "--seed", "7"),
        checkpoints=50, options=EngineOptions(interval=0.02, copiers=1, buffer_bytes=1 << 20))
    check_all(store, refs, tmp_path)
    with open_store(store, readonly=True) as s:
        records = s.list_checkpoints()
    assert sum(r["cow_copies"] for r in records) > 0, "no write ever raced a copier"


@pytest.mark.parametrize("pattern", ["hot", "seq"])
def test_consistency_patterns(tmp_path, pattern):
    store = tmp_path / "store"
    refs = run_with_references(
        store, synth("--size", "32M", "--fill", "0.5", "--rate", "50000", "--pattern", pattern,
                     "--partial", "0.5", "--seed", "3"), checkpoints=20)
    check_all(store, refs, tmp_path)


def test_consistency_hugetlb(tmp_path, hugepages):
    store = tmp_path / "store"
    refs = run_with_references(
        store, synth("--size", "64M", "--hugetlb", "--fill", "0.5", "--rate", "20000",
                     "--partial", "0.5", "--seed", "5"), checkpoints=10)
    check_all(store, refs, tmp_path)
