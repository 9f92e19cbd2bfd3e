"""Build tooling beside the targets: linking a library for an LLVM target (cross compilers)
and CUDA C to PTX (nvcc).

Below the flows (api, flows) and the tuner (tuning, remote), so that each can import it.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from tvm_scalpel.errors import ScalpelError
from tvm_scalpel.targets import TargetProfile

# Cross compilers for the LLVM architectures whose libraries we link here but run elsewhere:
# (compiler, the Debian package that has it).
CROSS_COMPILERS = {"aarch64": ("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu")}


def cross_linker(profile: TargetProfile | None):
    """``fcompile`` for ``export_library``: None (the host's cc) unless the target needs one."""
    if profile is None or profile.kind != "llvm":
        return None  # host code of GPU targets is compiled for this machine
    arch = profile.arch
    if arch in ("", "x86_64"):
        return None
    if arch not in CROSS_COMPILERS:
        raise ScalpelError(f"no shared library for {profile.triple}: a bare-metal target has no loader; "
                           "compile --target cortex-m4 -o OUT_DIR writes a C project instead")
    compiler, package = CROSS_COMPILERS[arch]
    if shutil.which(compiler) is None:
        raise ScalpelError(f"{compiler} not found: install the Debian package {package} "
                           f"to cross-compile for {profile.triple}")
    from tvm.support import cc

    return cc.cross_compiler(compiler)


def to_ptx(executable, arch: str) -> str:
    """PTX of every CUDA kernel in a compiled module, built with ``nvcc`` (the TVM wheel has no
    CUDA runtime: its device modules keep CUDA C source)."""
    if shutil.which("nvcc") is None:
        raise RuntimeError("nvcc not found")
    sources = [m.inspect_source("") for m in _device_modules(executable.mod)]
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, src in enumerate(sources):
            cu, ptx = Path(tmp) / f"k{i}.cu", Path(tmp) / f"k{i}.ptx"
            cu.write_text(src)
            run = subprocess.run(["nvcc", "--ptx", f"-arch={arch}", str(cu), "-o", str(ptx)],
                                 capture_output=True, text=True, timeout=300)
            if run.returncode:
                raise RuntimeError(f"nvcc failed: {run.stderr.strip().splitlines()[-1]}")
            out.append(ptx.read_text())
    return "\n".join(out)


def _device_modules(module):
    for m in module.imports:
        if "__global__" in (m.inspect_source("") if _has_source(m) else ""):
            yield m
        yield from _device_modules(m)


def _has_source(module) -> bool:
    try:
        module.inspect_source("")
        return True
    except Exception:
        return False
