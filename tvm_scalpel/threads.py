"""TVM's CPU thread pool size.

TVM sizes its pool once, from TVM_NUM_THREADS, else from a guess at the physical cores that
gives a single thread on this kind of 2-vCPU machine (``runtime.config_threadpool`` did not
change it here). Our large layers are scheduled to use all cores, so every entry point of ours
sets TVM_NUM_THREADS before the pool starts.
"""

from __future__ import annotations

import os


def configure_threads(n: int | None = None) -> int:
    """Ask for ``n`` threads (default: every CPU this process may run on) unless
    TVM_NUM_THREADS is already set. Effective only before TVM first runs parallel code."""
    if "TVM_NUM_THREADS" not in os.environ:
        os.environ["TVM_NUM_THREADS"] = str(n or len(os.sched_getaffinity(0)))
    return int(os.environ["TVM_NUM_THREADS"])


def num_threads() -> int:
    import tvm

    return int(tvm.get_global_func("runtime.NumThreads")())
