"""The record and map decoders fuzzed (hypothesis): whatever bytes a store holds for a record or
a map, every read answers or raises a StoreError (one line in the CLI), never another
exception. Part of the reliability suite."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_inspect import run_synth
from vmckpt.storage import StoreError, open_store
from vmckpt.storage.envelope import seal
from vmckpt.storage.inspect import check_store

pytestmark = pytest.mark.reliability

CKPT = 2  # of 3: a parent and a child of the value under test
KEY = CKPT.to_bytes(8, "big")

# msgpack-able values of any shape: the decoders must not trust a payload's types.
values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats()
    | st.binary(max_size=64) | st.text(max_size=16),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids,
                                                               max_size=6),
    max_leaves=20)


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("fuzz") / "store"
    run_synth(store, 3)
    return store


def originals(store: Path) -> dict[str, bytes]:
    with open_store(store) as s:
        return {cf: s.cf[cf][KEY] for cf in ("records", "maps")}


def blobs(good: bytes) -> st.SearchStrategy[bytes]:
    """Garbage, the good value cut or with bytes changed, and sealed payloads of any shape
    (a valid envelope around what the decoder must still refuse)."""
    def mutate(data: bytes, flips: list[tuple[int, int]], cut: int) -> bytes:
        b = bytearray(data[:cut] if cut else data)
        for at, byte in flips:
            if b:
                b[at % len(b)] = byte
        return bytes(b)

    return st.one_of(
        st.binary(max_size=512),
        st.builds(mutate, st.just(good), st.lists(st.tuples(st.integers(0, 1 << 20),
                                                            st.integers(0, 255)), max_size=4),
                  st.integers(0, len(good))),
        values.map(lambda v: seal(msgpack.packb(v))),
        st.dictionaries(st.sampled_from(["id", "parent", "ram_size", "page_size", "map",
                                         "kind", "pfns", "ids", "device_state", "time"]),
                        values, max_size=10).map(lambda d: seal(msgpack.packb(d))),
    )


def reads_answer_or_say_damaged(store: Path) -> None:
    with open_store(store, readonly=True) as s:
        for read in (s.list_checkpoints, lambda: s.get_record(CKPT), lambda: s.read_map(CKPT),
                     lambda: s.read_map(CKPT + 1), lambda: check_store(s)):
            with contextlib.suppress(StoreError):
                read()


@pytest.mark.parametrize("family", ["records", "maps"])
def test_any_stored_value_reads_as_an_answer_or_a_store_error(made, tmp_path, family):
    good = originals(made)[family]
    work = tmp_path / "store"

    @settings(max_examples=60, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture,
                                     HealthCheck.too_slow])
    @given(blob=blobs(good))
    def one(blob: bytes) -> None:
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(made, work)
        with open_store(work) as s:
            s.cf[family][KEY] = blob
        reads_answer_or_say_damaged(work)

    one()
