"""Latency measurement shared by the demo and the benchmarks.

Both runtimes are timed the same way, from Python, one call per inference on a pre-made input
(TVM: ``vm["main"](tensor)``; onnxruntime: ``session.run`` on a numpy array), best median over a
few repeats. TVM is also timed inside the VM (``time_evaluator``), without Python's call cost.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np


def median_call_us(fn: Callable[[], object], min_time_s: float = 0.2, repeats: int = 5) -> float:
    """Median over ``repeats`` of the mean time of one ``fn()`` call, in microseconds."""
    fn()
    start = time.perf_counter()
    calls = 0
    while time.perf_counter() - start < 0.02:  # calibrate: how many calls fill min_time_s
        fn()
        calls += 1
    per = (time.perf_counter() - start) / max(calls, 1)
    number = max(1, int(min_time_s / repeats / max(per, 1e-9)))
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        samples.append((time.perf_counter() - t0) / number * 1e6)
    return statistics.median(samples)


@dataclass
class TvmTiming:
    python_us: float  # one vm["main"](x) call from Python
    vm_us: float  # the same inside the VM, without Python


def time_tvm(executable, x: np.ndarray, min_time_s: float = 0.2) -> TvmTiming:
    import tvm

    dev = tvm.cpu()
    vm = tvm.relax.VirtualMachine(executable, dev)
    xt = tvm.runtime.tensor(np.ascontiguousarray(x), dev)
    python_us = median_call_us(lambda: vm["main"](xt), min_time_s)
    vm.set_input("main", xt)
    number = max(1, int(min_time_s / 5 / max(python_us * 1e-6, 1e-9)))
    res = vm.time_evaluator("invoke_stateful", dev, number=number, repeat=5)("main")
    return TvmTiming(python_us, float(res.median) * 1e6)


def ort_session(model, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def time_ort(model, x: np.ndarray, min_time_s: float = 0.2) -> tuple[float, int]:
    """Best of 1 and 2 intra-op threads: ``(microseconds per call, threads)``."""
    name = model.graph.input[0].name
    best = (float("inf"), 1)
    for threads in (1, 2):
        sess = ort_session(model, threads)
        us = median_call_us(lambda: sess.run(None, {name: x}), min_time_s)
        best = min(best, (us, threads))
    return best


def run_ort(model, x: np.ndarray) -> np.ndarray:
    sess = ort_session(model, 1)
    return sess.run(None, {model.graph.input[0].name: x})[0]
