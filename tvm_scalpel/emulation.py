"""Running aarch64 models on this x86 machine: a TVM RPC server under ``qemu-aarch64``.

``make setup-arm`` (``scripts/setup_arm.sh``) installs qemu-user and the aarch64 cross
toolchain, and builds ``.arm/``: an arm64 Python 3.11 sysroot and aarch64 wheels of the same
TVM as this Python. The server is that Python, emulated, serving TVM RPC on 127.0.0.1 only;
``tvm-scalpel run --rpc`` / ``remote.run_remote`` then run a library compiled with
``--target aarch64`` on it. Emulated time is not hardware time: use it for correctness only.

From a shell: ``python -m tvm_scalpel.emulation [--port P]`` serves in the foreground.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import ScalpelError

log = logging.getLogger("tvm_scalpel.emulation")

HOST = "127.0.0.1"  # never reachable from other machines: the server runs uploaded code
SERVER_SCRIPT = Path(__file__).with_name("_qemu_rpc_server.py")
READY = re.compile(r"^tvm-scalpel-rpc-ready (\d+)$", re.M)
TOOLS = ("qemu-aarch64", "aarch64-linux-gnu-gcc")
PINNED = ("apache-tvm", "apache-tvm-ffi")  # must match between the two sides of RPC


def arm_dir() -> Path:
    """Where ``make setup-arm`` put the sysroot and wheels: ``$TVM_SCALPEL_ARM_DIR`` or ``.arm/``."""
    env = os.environ.get("TVM_SCALPEL_ARM_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[1] / ".arm"


def _pins() -> list[str]:
    return [f"{name}=={importlib.metadata.version(name)}" for name in PINNED]


def arm_ready() -> str | None:
    """None when aarch64 models can run under emulation here, else why not (one line)."""
    for tool in TOOLS:
        if shutil.which(tool) is None:
            return f"{tool} not found: run `make setup-arm`"
    root = arm_dir()
    stamp = root / ".ready"
    if not stamp.is_file():
        return f"no aarch64 Python in {root}: run `make setup-arm`"
    built, wanted = stamp.read_text().split(), _pins()
    if built != wanted:
        return f"{root} has {' '.join(built)}, this Python {' '.join(wanted)}: run `make setup-arm`"
    return None


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the thread that started it ends (Linux), so a
    killed test run or shell never leaves an orphaned server listening."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class QemuRPCServer:
    """One RPC server process under qemu-aarch64 (use ``qemu_rpc_server`` for a scoped one).

    It lives until ``stop()`` or until the thread that started it ends."""

    def __init__(self, port: int | None = None, timeout_s: float = 60) -> None:
        reason = arm_ready()
        if reason is not None:
            raise ScalpelError(reason)
        root = arm_dir()
        # a given port is that port or an error; otherwise the first free one from a random start
        first = port if port is not None else _free_port()
        last = first + 1 if port is not None else min(first + 100, 65536)
        cmd = ["qemu-aarch64", "-L", str(root / "sysroot"),
               "-E", f"PYTHONPATH={root / 'pyarm'}", "-E", "TVM_USE_RUNTIME_LIB=1",
               str(root / "sysroot/usr/bin/python3.11"), "-u", str(SERVER_SCRIPT),
               HOST, str(first), str(last)]
        # the guest inherits our environment: none of this Python's (x86) settings must leak in
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "TVM_"))}
        self._stopped = False
        self._tmp = tempfile.TemporaryDirectory(prefix="scalpel-qemu-")
        self.log_path = Path(self._tmp.name) / "server.log"
        with open(self.log_path, "wb") as out:
            log.info("starting %s", " ".join(cmd))
            self.process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                            stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True,  # its own process group
                                            preexec_fn=_die_with_parent)
        try:
            self.port = self._wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        self.address = f"{HOST}:{self.port}"

    def _wait_ready(self, timeout_s: float) -> int:
        start = time.monotonic()
        while True:
            found = READY.search(self.log_path.read_text(errors="replace"))
            if found:
                log.info("aarch64 RPC server ready in %.1f s", time.monotonic() - start)
                return int(found.group(1))
            if self.process.poll() is not None:
                raise ScalpelError(f"the aarch64 RPC server exited with status {self.process.returncode} "
                                   f"before it was ready: {self.last_log_line()}")
            if time.monotonic() - start > timeout_s:
                raise ScalpelError(f"the aarch64 RPC server under qemu was not ready after {timeout_s:g} s"
                                   f" (last output: {self.last_log_line()})")
            time.sleep(0.1)

    def last_log_line(self) -> str:
        lines = [line.strip() for line in self.log_path.read_text(errors="replace").splitlines() if line.strip()]
        return lines[-1] if lines else "no output"

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        """Kill the server and every session process it forked (a second call does nothing)."""
        if self._stopped:
            return
        self._stopped = True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            log.warning("qemu-aarch64 (pid %d) did not exit after SIGKILL", self.process.pid)
        self._tmp.cleanup()

    def __enter__(self) -> QemuRPCServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def qemu_rpc_server(port: int | None = None, timeout_s: float = 60) -> Iterator[str]:
    """An aarch64 TVM RPC server under qemu for the ``with`` block; yields ``"127.0.0.1:PORT"``.

    Raises ScalpelError when ``.arm/`` is missing or the server is not up within ``timeout_s``.
    """
    server = QemuRPCServer(port, timeout_s)
    try:
        yield server.address
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tvm_scalpel.emulation",
                                     description="Serve TVM RPC from an emulated aarch64 CPU (qemu-aarch64), "
                                                 "on 127.0.0.1, until Ctrl-C.")
    parser.add_argument("--port", type=int, default=None, help="port to listen on (default: a free one)")
    parser.add_argument("--timeout", type=float, default=60, help="seconds to wait for the server to start")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for sig in (signal.SIGTERM, signal.SIGHUP):  # stop the server as Ctrl-C does
        signal.signal(sig, lambda *_: sys.exit(0))
    try:
        server = QemuRPCServer(args.port, args.timeout)
    except ScalpelError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # while starting: the server is already stopped
        return 130
    try:
        print(f"aarch64 RPC server (qemu-aarch64) on {server.address}; run a model compiled with "
              f"--target aarch64:\n  tvm-scalpel run --rpc {server.address} model.so --input x.npy -o y.npy\n"
              "Emulated time is not a speed figure. Ctrl-C stops the server.", flush=True)
        status = server.process.wait()
        print(f"error: the server exited with status {status}: {server.last_log_line()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
