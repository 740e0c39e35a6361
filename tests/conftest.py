"""Shared fixtures: a store in tmp_path, and running programs under the engine in-process."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from vmckpt.engine.cycle import Engine, EngineOptions
from vmckpt.engine.session import run_program
from vmckpt.storage import open_store


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--full", action="store_true",
                     help="the reliability suite (-m reliability) at full size: 100 engine "
                          "kills on the synthetic guest, 30 on the QEMU guest")


@pytest.fixture
def full(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--full"))


def run_with_references(store_path: Path, argv: Sequence[str], checkpoints: int,
                        options: EngineOptions | None = None,
                        reference: Callable[[memoryview], Any] = bytes) -> list[Any]:
    """Runs argv under the engine; returns reference(guest RAM) taken at each pause (test-only
    hook): a copy, or e.g. a digest where a copy of every checkpoint would not fit in memory."""
    refs: list[Any] = []

    def hook(engine: Engine) -> None:
        engine.on_paused = lambda e: refs.append(reference(e.tracker.ram_view()))

    async def go() -> int:
        with open_store(store_path, create=True) as store:
            return await run_program(argv, store, options or EngineOptions(interval=0.05),
                                     max_checkpoints=checkpoints, on_engine=hook,
                                     min_ram=4 << 20)

    asyncio.run(go())
    return refs


@pytest.fixture
def hugepages():
    """Reserves 2 MiB huge pages for a test (as root), and gives them back afterwards."""
    path = Path("/proc/sys/vm/nr_hugepages")
    old = int(path.read_text())
    try:
        path.write_text(str(old + 160))
    except OSError as e:
        pytest.skip(f"cannot reserve huge pages: {e}")
    if int(path.read_text()) < old + 64:
        path.write_text(str(old))
        pytest.skip("the kernel reserved too few huge pages")
    yield
    path.write_text(str(old))


def is_root() -> bool:
    return os.geteuid() == 0


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory):
    """A real three-master Redis Cluster on loopback for the whole session."""
    from redis_cluster import Cluster

    cluster = Cluster(tmp_path_factory.mktemp("redis")).start()
    yield cluster
    cluster.stop()


@pytest.fixture(params=["rocks", "cluster"])
def store_path(request: pytest.FixtureRequest, tmp_path: Path) -> Path | str:
    """A store not yet made, on each backend: a RocksDB directory, and a NAME on the session's
    Redis Cluster (emptied first: pages are shared between NAMEs)."""
    if request.param == "rocks":
        return tmp_path / "store"
    cluster = request.getfixturevalue("redis_cluster")
    cluster.flush()
    return cluster.url("test")
