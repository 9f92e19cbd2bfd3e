"""The closed vocabularies of the reports: a target's parallelism class, a layer's kind, the
kernel a layer runs on. Each is a ``str`` enum, so it prints, formats and compares as the text
it stood for before (``Parallelism.LOW == "low"``, ``f"{KernelKind.SPARSE}"`` is
``grouped-sparse``).
"""

from __future__ import annotations

import enum


class TextEnum(str, enum.Enum):
    """A ``str`` enum that prints as its value (``enum.StrEnum`` needs Python 3.11)."""

    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__


class Parallelism(TextEnum):
    """The paper's classes of hardware (``policy.RULES`` says what each prunes)."""

    LOW = "low"  # microcontrollers
    MODERATE = "moderate"  # CPUs
    HIGH = "high"  # GPUs


class LayerKind(TextEnum):
    FC = "fc"  # a dense layer (Gemm, MatMul)
    CONV = "conv"  # a 2-D convolution (shape then means the unfolded (O, C*KH*KW))


class KernelKind(TextEnum):
    """The kernel a layer runs on."""

    SPARSE = "grouped-sparse"  # ours, on the kept groups
    DENSE = "dense"  # our dense kernel (conv layers: the blocked NCHWc one or the patch one)
    DENSE_META_SCHEDULE = "dense (meta_schedule)"  # a kernel meta_schedule searched
    DENSE_GROUPED = "dense grouped"  # a grouped conv on the blocked kernel
    DENSE_DEPTHWISE = "dense depthwise"  # a depthwise conv on the blocked kernel
    # dense layers left to TVM's own pipeline (dlight); CUDA is the one target kind with our
    # sparse kernel but not our dense one (schedules.cuda)
    DENSE_TVM = "dense (TVM's cuda pipeline)"

    @property
    def short(self) -> str:
        """The kernel without who scheduled it: ``dense (meta_schedule)`` is ``dense``."""
        return "dense" if self in (KernelKind.DENSE_META_SCHEDULE, KernelKind.DENSE_TVM) else self.value
