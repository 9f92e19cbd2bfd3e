"""Build tooling shared by the flows and the tuner: how a library is linked for a target.

Below the flows (api, flows) and the tuner (tuning, remote), so that each can import it.
"""

from __future__ import annotations

import shutil

from .errors import ScalpelError
from .targets import TargetProfile

# Cross compilers for the LLVM triples whose libraries we link here but run elsewhere.
CROSS_COMPILERS = {"aarch64": ("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu")}


def cross_linker(profile: TargetProfile | None):
    """``fcompile`` for ``export_library``: None (the host's cc) unless the target needs one."""
    if profile is None or profile.kind != "llvm":
        return None  # host code of GPU targets is compiled for this machine
    triple = str(profile.target.attrs.get("mtriple", ""))
    arch = triple.split("-")[0]
    if not triple or arch == "x86_64":
        return None
    if arch not in CROSS_COMPILERS:
        raise ScalpelError(f"no shared library for {triple}: a bare-metal target has no loader; "
                           "compile --target cortex-m4 -o OUT_DIR writes a C project instead")
    compiler, package = CROSS_COMPILERS[arch]
    if shutil.which(compiler) is None:
        raise ScalpelError(f"{compiler} not found: install the Debian package {package} "
                           "to cross-compile for {triple}".replace("{triple}", triple))
    from tvm.support import cc

    return cc.cross_compiler(compiler)
