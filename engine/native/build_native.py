"""cffi (API mode) build of vmckpt.engine._native: fault service, copiers, hashing."""

from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
# The tracker's files (tracker_int.h says which does what).
TRACKER = ["tracker", "tracker_pool", "tracker_fault", "tracker_copiers", "tracker_arm",
           "tracker_async", "tracker_wp"]

ffi = FFI()
ffi.cdef((HERE / "tracker_cdef.h").read_text())
ffi.cdef("""
/* glibc's allocator knobs (malloc.h), for engine/heap.py. */
#define M_ARENA_MAX ...
#define M_MMAP_THRESHOLD ...
int mallopt(int param, int value);
""")
ffi.set_source(
    "vmckpt.engine._native",
    '#include <malloc.h>\n#include "tracker.h"',
    sources=[f"engine/native/{name}.c" for name in TRACKER],
    include_dirs=["engine/native"],
    libraries=["crypto", "pthread"],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
)

if __name__ == "__main__":
    ffi.compile(verbose=True)
