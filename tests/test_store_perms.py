"""A store, a restored RAM image and an export hold guest memory: nobody but their owner may
read them, whatever the umask (checked as a second user, `nobody`). And a directory that is not
a vmckpt store is never written to; a refused run leaves no store behind; a store its user
can read but not write serves every reading command."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import is_root
from rocksdict import AccessType, Options, Rdict
from test_inspect import VMCKPT, assert_one_line_error, ok, run_synth, vmckpt
from vmckpt.lab.synthguest import command as synth
from vmckpt.storage import NotAStore, open_store

pytestmark = pytest.mark.skipif(not is_root(), reason="switches users: needs root")
OTHER = "nobody"


@pytest.fixture
def shared() -> Iterator[Path]:
    """A directory every user can enter (pytest's own are private to root), so that only the
    modes vmckpt gives its files keep the other user out."""
    path = Path(tempfile.mkdtemp(prefix="vmckpt-perms-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


@pytest.fixture
def open_umask() -> Iterator[None]:
    """The most permissive umask: vmckpt's modes must not depend on it."""
    old = os.umask(0)
    yield
    os.umask(old)


def as_other(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["runuser", "-u", OTHER, "--", *argv], capture_output=True, text=True,
                          timeout=60)


def modes(path: Path) -> dict[str, int]:
    return {str(p.relative_to(path)): stat.S_IMODE(p.lstat().st_mode)
            for p in [path, *path.rglob("*")]}


def test_the_other_user_can_read_what_is_not_private(shared):
    """The control: in this directory, a file of the usual mode is readable by the other user,
    so the refusals below are vmckpt's doing."""
    (shared / "open").write_text("guest ram")
    (shared / "open").chmod(0o644)
    assert as_other("cat", str(shared / "open")).stdout == "guest ram"


def test_store_image_and_export_are_private(shared, open_umask):
    store = shared / "store"
    run_synth(store, 3)
    got = modes(store)
    assert got.pop(".") == 0o700
    assert got and all(mode == 0o600 for mode in got.values()), got
    stolen = shared / "stolen"
    stolen.mkdir()
    shutil.chown(stolen, OTHER)
    for argv in (["ls", str(store)], ["cat", str(store / "CURRENT")],
                 ["cp", "-r", str(store), str(stolen)]):
        r = as_other(*argv)
        assert r.returncode != 0 and "Permission denied" in r.stderr, (argv, r)
    assert not [p for p in stolen.rglob("*") if p.is_file()]

    image = shared / "ram.img"
    image.write_bytes(b"old")
    image.chmod(0o644)  # an image that was there: narrowed before the guest's RAM goes in
    ok("restore", "--store", str(store), "--image", str(image), "latest")
    assert stat.S_IMODE(image.stat().st_mode) == 0o600 and image.stat().st_size == 16 << 20
    r = as_other("cat", str(image))
    assert r.returncode != 0 and "Permission denied" in r.stderr

    out = shared / "export"
    ok("export", "--store", str(store), "-o", str(out), "2")
    got = modes(out)
    assert got.pop(".") == 0o700 and set(got) == {"ram.img", "manifest.json"}
    assert all(mode == 0o600 for mode in got.values()), got
    r = as_other("cat", str(out / "ram.img"))
    assert r.returncode != 0 and "Permission denied" in r.stderr
    # Into a directory the user already has, the files are private and it keeps its mode.
    mine = shared / "mine"
    mine.mkdir(0o755)
    ok("export", "--store", str(store), "-o", str(mine), "2")
    assert stat.S_IMODE(mine.stat().st_mode) == 0o755
    assert {m for name, m in modes(mine).items() if name != "."} == {0o600}


def test_a_store_made_world_readable_is_narrowed_when_an_engine_opens_it(shared, open_umask):
    store = shared / "store"
    run_synth(store, 2)
    for p in [store, *store.iterdir()]:
        p.chmod(0o755 if p.is_dir() else 0o644)  # as stores were made before
    assert as_other("cat", str(store / "CURRENT")).returncode == 0
    run_synth(store, 1)
    got = modes(store)
    assert got.pop(".") == 0o700 and set(got.values()) == {0o600}


# ---------------------------------------------------------------- foreign directories


def digest_tree(path: Path) -> dict[str, str]:
    """Every file under path with its content and mode: what "unchanged" means."""
    return {str(p.relative_to(path)): (hashlib.sha256(p.read_bytes()).hexdigest()
                                       if p.is_file() else "dir") + oct(p.stat().st_mode)
            for p in sorted(path.rglob("*"))}


def other_rocksdb(path: Path, families: tuple[str, ...]) -> None:
    """Another program's RocksDB (raw mode, like vmckpt's): some families, some keys."""
    opts = Options(raw_mode=True)
    opts.create_if_missing(True)
    opts.create_missing_column_families(True)
    db = Rdict(str(path), opts, column_families={c: Options(raw_mode=True) for c in families})
    db[b"theirs"] = b"data"
    for c in families:
        cf = db.get_column_family(c)
        cf[b"k"] = b"v"
        cf.close()
    db.close()


@pytest.mark.parametrize("families", [("users",), ("pages", "records", "maps")],
                         ids=["other-families", "same-families-no-format"])
def test_a_foreign_rocksdb_is_refused_untouched(tmp_path, families):
    foreign = tmp_path / "foreign"
    other_rocksdb(foreign, families)
    before = digest_tree(foreign)
    for argv in (["run", "--store", str(foreign), "--min-ram", "4M", "--", *synth()],
                 ["ls", "--store", str(foreign)], ["check", "--store", str(foreign)],
                 ["check", "--repair", "--store", str(foreign)],
                 ["gc", "--store", str(foreign)]):
        assert_one_line_error(vmckpt(*argv), "not a vmckpt store")
        assert digest_tree(foreign) == before, argv  # not a family added, not a LOG rotated
    with pytest.raises(NotAStore):
        open_store(foreign, create=True)
    assert digest_tree(foreign) == before
    # Still theirs, as it was.
    db = Rdict(str(foreign), Options(raw_mode=True),
               column_families={c: Options(raw_mode=True) for c in families},
               access_type=AccessType.read_only())
    assert db[b"theirs"] == b"data" and set(Rdict.list_cf(str(foreign))) == {"default", *families}
    db.close()


@pytest.mark.parametrize("argv", [
    ["qemu-system-x86_64", "-m", "256M", "-nographic"],  # no shared memory backend: refused
    ["/nonexistent/program"],
    ["true"],  # exits before it maps any guest RAM
], ids=["refused-qemu", "missing-program", "no-guest-ram"])
def test_a_refused_run_leaves_no_store(tmp_path, argv):
    store = tmp_path / "store"
    r = vmckpt("run", "--store", str(store), "--min-ram", "4M", "--attach-timeout", "20s", "--",
               *argv)
    assert r.returncode == 2 and r.stderr.startswith("vmckpt: "), r.stderr
    assert not store.exists()
    # An empty directory the user made stays, empty.
    store.mkdir()
    vmckpt("run", "--store", str(store), "--min-ram", "4M", "--", *argv)
    assert store.is_dir() and not any(store.iterdir())


# ---------------------------------------------------------------- read-only stores


def without_write(*args: str) -> subprocess.CompletedProcess[str]:
    """vmckpt as a user who can read the store but not write it: root without its
    capabilities (so that file modes bind it) over a store made read-only."""
    return subprocess.run(["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--", *VMCKPT,
                           *args], capture_output=True, text=True, timeout=120)


def test_a_read_only_store_serves_every_reading_command(tmp_path):
    store = tmp_path / "store"
    run_synth(store, 3)
    subprocess.run(["chmod", "-R", "a-w", str(store)], check=True)
    before = digest_tree(store)
    out = tmp_path / "out"
    out.mkdir()
    try:
        # The control: this user cannot write into it.
        probe = subprocess.run(["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--",
                                "touch", str(store / "x")], capture_output=True, text=True)
        assert probe.returncode != 0 and "Permission denied" in probe.stderr
        for argv in (["ls"], ["show", "2"], ["diff", "1", "3"], ["stats"],
                     ["check", "--read-data"], ["restore", "--image", str(out / "ram.img"), "3"],
                     ["export", "2", "-o", str(out / "export")]):
            r = without_write(*argv, "--store", str(store))
            assert r.returncode == 0, (argv, r.stderr)
        assert (out / "ram.img").stat().st_size == 16 << 20
        assert digest_tree(store) == before
        # What writes says so in one line.
        r = without_write("gc", "--store", str(store))
        assert r.returncode == 2 and r.stderr.startswith("vmckpt: ") and \
            r.stderr.count("\n") == 1, r.stderr
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(store)], check=True)
