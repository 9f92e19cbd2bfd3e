"""Target profiles: what tvm-scalpel needs to know about the hardware.

A profile wraps a ``tvm.target.Target`` with the two facts Scalpel's choices depend on: the fp32
SIMD width (the natural group width g) and the parallelism class of the paper (low: micro-
controllers, moderate: CPUs, high: GPUs).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import tvm
from tvm.target import codegen

from .errors import ScalpelError
from .kinds import Parallelism

X86_TRIPLE = "x86_64-linux-gnu"


@dataclass(frozen=True)
class TargetProfile:
    name: str
    target: tvm.target.Target
    simd_width: int  # fp32 lanes of one vector register
    parallelism: Parallelism

    @property
    def group_width(self) -> int:
        """The group width g of the rules: the SIMD width, in the numbers a layer's kernel
        packs into one register. An M-profile core with the DSP extension (thumbv7em: the
        Cortex-M4 / M7) has no fp32 SIMD but multiplies two 16-bit lanes of one register at once
        (``smlad``): g = 2, one index for every pair of weights (in fp32 too, where the pair
        halves the index loads)."""
        if self.simd_width == 1 and self.arch.startswith("thumbv7em"):
            return 2
        return self.simd_width

    @property
    def kind(self) -> str:
        return str(self.target.kind.name)

    @property
    def triple(self) -> str:
        """The LLVM target triple ("" for other kinds, or an LLVM target without one)."""
        return str(self.target.attrs.get("mtriple", "")) if self.kind == "llvm" else ""

    @property
    def arch(self) -> str:
        """The triple's architecture: ``x86_64``, ``aarch64``, ``thumbv7em``, ... ("" if none)."""
        return self.triple.split("-")[0]


def host_target() -> tvm.target.Target:
    """The machine we run on. ``mcpu=native`` is refused with an explicit triple, so ask LLVM."""
    return tvm.target.Target(
        {"kind": "llvm", "mtriple": X86_TRIPLE, "mcpu": codegen.llvm_get_system_cpu()}
    )


def llvm_simd_width(target: tvm.target.Target) -> int:
    """fp32 lanes of the widest vector unit the LLVM target has."""
    def has(feature: str) -> bool:
        return bool(codegen.target_has_features(feature, target))

    if has("avx512f"):
        return 16
    if has("avx2") or has("avx"):
        return 8
    if has("neon") or has("sse2") or has("mve.fp"):
        return 4
    return 1


def _profile_of(name: str, target: tvm.target.Target) -> TargetProfile:
    kind = target.kind.name
    if kind == "llvm":
        triple = str(target.attrs.get("mtriple", ""))
        low = triple.startswith(("thumb", "arm-none", "armv7m", "armv7em"))
        return TargetProfile(name, target, llvm_simd_width(target),
                             Parallelism.LOW if low else Parallelism.MODERATE)
    if kind in ("cuda", "rocm", "vulkan", "metal", "opencl"):
        return TargetProfile(name, target, 32, Parallelism.HIGH)  # a warp of fp32 lanes
    if kind == "c":
        return TargetProfile(name, target, 1, Parallelism.LOW)
    raise ScalpelError(f"unsupported target kind {kind!r}")


# Named targets besides "x86" (the host). "cuda" takes an optional arch: "cuda:sm_90".
AARCH64 = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}
CORTEX_M4 = {"kind": "llvm", "mtriple": "thumbv7em-none-eabihf", "mcpu": "cortex-m4",
             "mfloat-abi": "hard"}
DEFAULT_CUDA_ARCH = "sm_80"
NAMES = ("x86", "aarch64", "cuda[:sm_XX]", "cortex-m4")


def _named(text: str) -> TargetProfile | None:
    if text == "aarch64":
        return _profile_of("aarch64", tvm.target.Target(AARCH64))
    if text == "cortex-m4":
        return _profile_of("cortex-m4", tvm.target.Target(CORTEX_M4))
    if text == "cuda" or text.startswith("cuda:"):
        arch = text.partition(":")[2] or DEFAULT_CUDA_ARCH
        if not (arch.startswith("sm_") and arch[3:].isdigit()):
            raise ScalpelError(f"invalid CUDA arch {arch!r}: use e.g. cuda:sm_90")
        return _profile_of("cuda", tvm.target.Target({"kind": "cuda", "arch": arch}))
    return None


def resolve_target(spec: str | tvm.target.Target | TargetProfile | None = "x86") -> TargetProfile:
    """A target name (``x86`` = the host CPU, ``aarch64``, ``cuda[:sm_XX]``, ``cortex-m4``), a
    TVM JSON target string, or a ``Target``."""
    if isinstance(spec, TargetProfile):
        return spec
    if spec is None or spec == "x86":
        return _profile_of("x86", host_target())
    if isinstance(spec, tvm.target.Target):
        return _profile_of(str(spec.kind.name), spec)
    text = str(spec).strip()
    named = _named(text)
    if named is not None:
        return named
    if not text.startswith("{"):
        raise ScalpelError(
            f"unknown target {text!r}: use one of {', '.join(NAMES)} or a TVM JSON target such as "
            '\'{"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell"}\''
        )
    try:
        config = json.loads(text)
        target = tvm.target.Target(config)
    except Exception as err:  # json or TVM's own parse error: one line is enough
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ScalpelError(f"invalid target {text!r}: {first}") from None
    return _profile_of(str(config.get("kind", "custom")), target)
