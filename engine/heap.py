"""The process's allocator, set for a long run with many threads (copiers, RocksDB's own).

glibc gives each thread that allocates its own arena (up to 8 per core) and lets the
threshold above which it maps blocks directly rise with the largest block freed; large
transient blocks (write batches, memtable chunks, page buffers) then settle in arenas whose
freed space is rarely returned. Under bench/bench_memory.py, with RocksDB's memory already capped,
the engine's own RSS still crept (302 -> 346 MiB from 20 to 55 s) with the defaults, and held
level with 2 arenas and a fixed 1 MiB threshold.
"""

from vmckpt.engine._native import lib

ARENAS = 2
MMAP_THRESHOLD = 1 << 20  # blocks from here up are mapped, and unmapped when freed


def bound_heap() -> None:
    """Call before threads start: arenas already made stay."""
    lib.mallopt(lib.M_ARENA_MAX, ARENAS)
    lib.mallopt(lib.M_MMAP_THRESHOLD, MMAP_THRESHOLD)
