"""x86-64 (AVX-512, AVX2, SSE): the rule of the LLVM CPU kernels (``cpu_kernels.py``) on x86.

Lanes: the fp32 width of the widest vector unit (16 with AVX-512, 8 with AVX / AVX2, 4 with
SSE; ``targets.llvm_simd_width``), which is also the default group width g. Dense panels: nr = 2
vectors (``cpu_kernels.gemm_tile``: 8 x 2 zmm accumulators on AVX-512, 6 x 2 ymm on AVX2).
"""

from __future__ import annotations

from .cpu_kernels import LlvmCpuRule


class X86Rule(LlvmCpuRule):
    name = "x86"
    # Measured on 2 idle Zen 4 cores: a 784x300 dense layer (235k multiply-adds) runs 1.7x
    # faster on two threads, a 92%-pruned one (19k) slower. Below this, one thread.
    parallel_min_macs = 200_000
    unroll = 2
    batch_tile = 8

    def vector_registers(self, lanes: int) -> int:
        """32 zmm with AVX-512; 16 ymm / xmm with AVX2 / SSE."""
        return 32 if lanes >= 16 else 16


RULE = X86Rule()
