"""AArch64 (NEON): the rule of the LLVM CPU kernels (``cpu_kernels.py``) on 64-bit Arm.

Lanes: 4 fp32 in a 128-bit q register (the default group width g = 4). Dense panels: nr = 2
vectors, a 6 x 2 block of accumulators (``cpu_kernels.gemm_tile``).
"""

from __future__ import annotations

from .cpu_kernels import LlvmCpuRule


class AArch64Rule(LlvmCpuRule):
    name = "aarch64"
    parallel_min_macs = 200_000  # the x86 figure: not measured on an Arm CPU yet
    unroll = 2
    batch_tile = 8

    def vector_registers(self, lanes: int) -> int:
        """32 NEON q registers at any width."""
        return 32


RULE = AArch64Rule()
