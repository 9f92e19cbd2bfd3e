"""Cortex-M4 (Armv7E-M with the single-precision FPU, no fp32 SIMD): the rule of the LLVM CPU
kernels (``cpu_kernels.py``) on the paper's microcontroller.

Lanes: 1 (``targets.llvm_simd_width`` finds no fp32 vector unit), so the dense kernels run
scalar and the default group width is 1; the conv kernels block by 4 channels
(``LlvmCpuRule.conv_lanes``). Registers: the FPU's 32 single-precision s registers.
"""

from __future__ import annotations

from .cpu_kernels import LlvmCpuRule


class CortexM4Rule(LlvmCpuRule):
    name = "cortex-m4"
    # Unchanged from the x86 figure (a bare-metal M4 has no thread pool to spread rows over;
    # what the firmware path needs is for it to decide).
    parallel_min_macs = 200_000
    unroll = 2
    batch_tile = 8

    def vector_registers(self, lanes: int) -> int:
        return 32


RULE = CortexM4Rule()
