"""Whether this process may create a userfaultfd, asked the way the preload library asks.

Without one the preload library can only warn on the program's stderr and let guest RAM run
untracked; the engine would then wait for a handoff that never comes. Probing here, with the
same syscall and flags, tells the user the real cause and the fix instead."""

from __future__ import annotations

import ctypes
import errno
import os
import platform
from pathlib import Path

SYS_USERFAULTFD = {"x86_64": 323, "aarch64": 282, "riscv64": 282}
SYSCTL = Path("/proc/sys/vm/unprivileged_userfaultfd")


def userfaultfd_problem() -> str | None:
    """None if a userfaultfd can be created here, else one line: why, and how to allow it."""
    nr = SYS_USERFAULTFD.get(platform.machine())
    if nr is None:
        return None  # an architecture we do not know the number for: let the handoff tell
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.syscall(nr, os.O_CLOEXEC | os.O_NONBLOCK)
    if fd >= 0:
        os.close(fd)
        return None
    err = ctypes.get_errno()
    if err == errno.ENOSYS:
        return "this kernel has no userfaultfd (CONFIG_USERFAULTFD): vmckpt cannot track RAM"
    if err != errno.EPERM:
        return None  # not a permission problem (e.g. too many open files): not ours to judge
    try:
        setting = f" (vm.unprivileged_userfaultfd is {SYSCTL.read_text().strip()})"
    except OSError:
        setting = ""
    return (f"userfaultfd is not permitted for this user (uid {os.geteuid()}){setting}: run "
            "vmckpt as root, or allow it with sysctl vm.unprivileged_userfaultfd=1")
