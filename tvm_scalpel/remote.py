"""Running and measuring on other machines through TVM RPC.

``--rpc HOST:PORT`` names an RPC server (``python -m tvm.exec.rpc_server``);
``--rpc tracker://HOST:PORT/KEY`` asks a tracker for a server registered under KEY. Every
session has a timeout, so a server that is down or dies mid-run is a clear error, not a hang.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from .errors import ScalpelError

SESSION_TIMEOUT_S = 120


def _host_port(text: str, spec: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise ScalpelError(f"invalid RPC address {spec!r}: use HOST:PORT or tracker://HOST:PORT/KEY")
    return host, int(port)


def connect(spec: str, timeout: int = SESSION_TIMEOUT_S):
    """An RPC session to a server (HOST:PORT) or to one a tracker hands out."""
    from tvm import rpc

    try:
        if spec.startswith("tracker://"):
            address, _, key = spec[len("tracker://"):].partition("/")
            if not key:
                raise ScalpelError(f"invalid RPC address {spec!r}: the tracker needs a /KEY")
            host, port = _host_port(address, spec)
            tracker = rpc.connect_tracker(host, port)
            return tracker.request(key, priority=1, session_timeout=timeout)
        host, port = _host_port(spec, spec)
        return rpc.connect(host, port, session_timeout=timeout)
    except ScalpelError:
        raise
    except Exception as err:
        raise ScalpelError(f"cannot reach the RPC server {spec}: {_last_line(err)}") from None


def _last_line(err: Exception) -> str:
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


def upload_library(session, path: str | os.PathLike):
    """Upload a library and load it on the remote side."""
    path = Path(path)
    try:
        session.upload(str(path))
        return session.load_module(path.name)
    except Exception as err:
        raise ScalpelError(f"loading {path.name} on the RPC server failed: {_last_line(err)}") from None


def run_remote(spec: str, library: str | os.PathLike, x: np.ndarray,
               timeout: int = SESSION_TIMEOUT_S, min_repeat_ms: int | None = None,
               named: bool = False):
    """Run a compiled model (``tvm-scalpel compile``) on the RPC server; the server ends the
    session after ``timeout`` seconds. Returns what ``run_library`` does (its output, or a dict
    by ONNX name when it has several; always the dict with ``named``). With ``min_repeat_ms``,
    also time it there (the VM's ``invoke_stateful`` in TVM's evaluator, median of 5 runs of at
    least that long) and return ``(output, seconds per call)``."""
    from tvm import relax, runtime

    from . import interrupts
    from .signature import check_input, library_signature, named_outputs

    session = connect(spec, timeout)
    lib = upload_library(session, library)
    try:
        dev = session.cpu()
        vm = relax.VirtualMachine(lib, dev)
        signature = library_signature(vm)
    except Exception as err:
        raise ScalpelError(f"running on the RPC server {spec} failed: {_last_line(err)}") from None
    check_input(x, signature)
    try:
        xt = runtime.tensor(np.ascontiguousarray(x), dev)
        # the stateful calls: a tuple result stays on the server, its fields come back one by one
        vm.set_input("main", xt)
        vm.invoke_stateful("main")
        outs = named_outputs(vm.get_outputs("main"), signature)
        out = outs if named or len(outs) > 1 else next(iter(outs.values()))
        if min_repeat_ms is None:
            return out
        timer = vm.time_evaluator("invoke_stateful", dev, number=10, repeat=5, min_repeat_ms=min_repeat_ms)
        return out, float(np.median(timer("main").results))
    except Exception as err:
        if interrupts.is_interrupt(err):
            raise KeyboardInterrupt from None
        raise ScalpelError(f"running on the RPC server {spec} failed: {_last_line(err)}") from None


def time_remote(spec: str, executable, args: list[np.ndarray], fcompile=None,
                min_repeat_ms: int = 20) -> float:
    """Seconds per call of a kernel executable's ``main`` on the RPC server."""
    from tvm import runtime

    session = connect(spec)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.so"
        if fcompile is None:
            executable.export_library(str(path))
        else:
            executable.export_library(str(path), fcompile=fcompile)
        lib = upload_library(session, path)
    try:
        dev = session.cpu()
        tensors = [runtime.tensor(a, dev) for a in args]
        timer = lib.time_evaluator("main", dev, number=10, repeat=5, min_repeat_ms=min_repeat_ms)
        return float(np.median(timer(*tensors).results))
    except Exception as err:
        raise ScalpelError(f"measuring on the RPC server {spec} failed: {_last_line(err)}") from None
