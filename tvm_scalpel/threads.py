"""TVM's CPU thread pool size.

TVM sizes its pool once, from TVM_NUM_THREADS, else from a guess at the physical cores that
gives a single thread on this kind of 2-vCPU machine (``runtime.config_threadpool`` did not
change it here). Our large layers are scheduled to use all cores, so every entry point of ours
sets TVM_NUM_THREADS before the pool starts, and every library we export carries a load-time
constructor (:data:`THREADS_CONSTRUCTOR_C`) that does the same in a process that loads the
library with plain TVM and never imports tvm_scalpel.
"""

from __future__ import annotations

import os
from pathlib import Path


def configure_threads(n: int | None = None) -> int:
    """Ask for ``n`` threads (default: every CPU this process may run on) unless
    TVM_NUM_THREADS is already set. Effective only before TVM first runs parallel code."""
    if "TVM_NUM_THREADS" not in os.environ:
        os.environ["TVM_NUM_THREADS"] = str(n or len(os.sched_getaffinity(0)))
    return int(os.environ["TVM_NUM_THREADS"])


def num_threads() -> int:
    import tvm

    return int(tvm.get_global_func("runtime.NumThreads")())


# Linked into every exported library. The dynamic loader runs it when the library is loaded
# (``tvm.runtime.load_module``), which is before the library's first parallel kernel starts
# TVM's thread pool (the pool reads TVM_NUM_THREADS with getenv when it is created). A value
# the user set is kept; a pool that already runs is not resized. Valid C and C++ (the host
# link step may compile it with g++), for any target with a glibc-like libc (x86-64, aarch64).
THREADS_CONSTRUCTOR_C = r"""
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

__attribute__((constructor)) static void tvm_scalpel_default_threads(void) {
  if (getenv("TVM_NUM_THREADS") != NULL) return;
  long n = 0;
#ifdef CPU_COUNT
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) n = CPU_COUNT(&set);
#endif
  if (n <= 0) n = sysconf(_SC_NPROCESSORS_ONLN);
  if (n <= 0) return;
  char text[24];
  snprintf(text, sizeof(text), "%ld", n);
  setenv("TVM_NUM_THREADS", text, 0);
}
"""


def threads_constructor_source(directory: str | os.PathLike) -> str:
    """Write :data:`THREADS_CONSTRUCTOR_C` into ``directory``; the path, for ``addons=``."""
    path = Path(directory) / "tvm_scalpel_threads.c"
    path.write_text(THREADS_CONSTRUCTOR_C)
    return str(path)
