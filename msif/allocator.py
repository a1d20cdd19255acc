"""glibc's allocator set to keep freed memory for reuse, for the numerical work (the CLI and its workers call it).

PyTorch's CPU tensors come from glibc malloc. By default glibc maps buffers above a moving threshold fresh from the
kernel and unmaps them when freed, and returns freed memory at the top of its heap, so a loop of Hessian-vector
products whose temporaries differ in size and lifetime touches new pages on every product. Measured on the MNIST
network (1,000-example Hessian, 2 threads): 123,000 page faults and 0.36 s of system time per product, a quarter of
its CPU time; with buffers below 32 MiB served from the heap and the heap never trimmed, 461 faults, no system
time, and products 20-25% faster (docs/speed.md). The cost: memory msif frees stays with the process (its resident
size stays at its peak) until it exits, where it is reused by the next allocation.

`MSIF_KEEP_FREED_MEMORY=0` in the environment leaves glibc's defaults alone.
"""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20  # the largest value glibc accepts on 64-bit: bigger buffers are still mapped
TRIM_THRESHOLD = 2**31 - 1  # never give the heap's top back


def keep_freed_memory() -> bool:
    """Make glibc malloc reuse freed memory instead of returning it to the kernel (see the module docstring).
    True when the setting is in effect; False where the C library is not glibc (macOS, musl: nothing is changed)
    or MSIF_KEEP_FREED_MEMORY=0. Calling it again is harmless."""
    if os.environ.get("MSIF_KEEP_FREED_MEMORY", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # not glibc: musl's mallopt does nothing
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    done = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not done:
        log.info("glibc refused the allocator settings; its defaults stay")
    return done
