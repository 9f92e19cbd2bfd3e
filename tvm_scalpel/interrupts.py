"""Ctrl-C for the command line: one line, exit status 130, no partial output, at any moment.

Imports nothing heavy: ``cli.main`` installs this before TVM is imported, so an interrupt while
TVM loads is handled like any other.

* The first SIGINT raises ``KeyboardInterrupt`` in the main thread, so ``with`` blocks unwind
  (``atomic_output`` removes its temporary file) and ``cli.main`` reports it. TVM turns a
  KeyboardInterrupt raised inside a Python callback (our passes) into a RuntimeError/TVMError
  on its way out of C++; ``is_interrupt`` recognises those by the flag set here.
* The main thread can sit in one long C++ call (LLVM codegen, an RPC wait) where no Python
  handler runs, or some code may swallow the exception. A watchdog thread, woken through
  ``signal.set_wakeup_fd`` even then, ends the process after ``GRACE_S`` seconds (or at once on
  a second Ctrl-C): temporary outputs removed, the one line written, ``os._exit(130)``.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

MESSAGE = b"tvm-scalpel: interrupted\n"
EXIT_STATUS = 130
GRACE_S = 3.0

_once = threading.Lock()  # taken by the first report()
_temps: set[str] = set()  # temporary outputs being written (atomic_output)
_count = 0
_installed = False


def interrupted() -> bool:
    """Whether a SIGINT reached this process since ``install``."""
    return _count > 0


def check() -> None:
    """Raise KeyboardInterrupt if an interrupt came (and was perhaps swallowed on the way)."""
    if interrupted():
        raise KeyboardInterrupt


def is_interrupt(err: BaseException) -> bool:
    """Is ``err`` an interrupt, possibly wrapped by TVM's C++ side into another exception?"""
    if isinstance(err, KeyboardInterrupt) or interrupted():
        return True
    seen = set()
    while err is not None and id(err) not in seen:  # the message or the chain names it
        seen.add(id(err))
        if isinstance(err, KeyboardInterrupt) or "KeyboardInterrupt" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


def report() -> None:
    """Write the one line, once (os.write: safe inside a signal handler or from a thread)."""
    if not _once.acquire(blocking=False):  # an atomic test-and-set that never waits (no deadlock
        return                              # when a second SIGINT lands in here)
    try:
        sys.stderr.flush()
    except Exception:  # noqa: BLE001 - stderr may be mid-write in the interrupted thread
        pass
    os.write(2, MESSAGE)


def add_temp(path: str) -> None:
    _temps.add(path)


def discard_temp(path: str) -> None:
    _temps.discard(path)


def _hard_exit() -> None:
    for path in list(_temps):
        try:
            if os.path.isdir(path) and not os.path.islink(path):  # a project folder being written
                import shutil

                shutil.rmtree(path, ignore_errors=True)
            else:
                os.unlink(path)
        except OSError:
            pass
    report()
    os._exit(EXIT_STATUS)


def _handler(signum, frame) -> None:
    global _count
    _count += 1
    if _count == 1:
        raise KeyboardInterrupt
    _hard_exit()  # a second Ctrl-C: the first is taking too long to unwind


def _watchdog(read_fd: int) -> None:
    while True:
        try:
            data = os.read(read_fd, 64)
        except OSError:
            return
        if not data:
            return
        if signal.SIGINT in data:
            break
    timer = threading.Timer(GRACE_S, _hard_exit)
    timer.daemon = True
    timer.start()


def _quiet_unraisable(previous):
    """An interrupt that lands in a finaliser is 'ignored' with a traceback on stderr: hide it."""
    def hook(unraisable):
        if interrupted() or isinstance(unraisable.exc_value, KeyboardInterrupt):
            return
        previous(unraisable)
    return hook


def install() -> None:
    """Take over SIGINT for the rest of this process (the ``tvm-scalpel`` program only)."""
    global _installed
    if _installed or threading.current_thread() is not threading.main_thread():
        return
    _installed = True
    signal.signal(signal.SIGINT, _handler)
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    threading.Thread(target=_watchdog, args=(read_fd,), name="tvm-scalpel-interrupt",
                     daemon=True).start()
    sys.unraisablehook = _quiet_unraisable(sys.unraisablehook)


def finished() -> None:
    """The command is over and its output written: a late Ctrl-C changes nothing now."""
    if _installed and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
