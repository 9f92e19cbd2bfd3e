"""The static memory plan: every activation in one arena, no heap.

The layers form a chain, so at any moment only two activations are live: the running layer's
input and its output. The first layer reads the caller's input and the last one writes the
caller's output buffer; every other activation goes to one end of the arena, alternating, so
that a layer's output never overlaps its input. The arena is then as large as the largest
input + output pair of any layer, which no plan that keeps whole activations can beat.
"""

from __future__ import annotations

from dataclasses import dataclass

ALIGN = 4  # elements: offsets stay 16-byte aligned for float, 8 for int16


@dataclass(frozen=True)
class Slot:
    """Where one layer reads and writes: ``None`` is the caller's buffer (``in`` / ``out``)."""

    input_offset: int | None
    output_offset: int | None
    live: int  # arena elements in use while the layer runs


@dataclass(frozen=True)
class MemoryPlan:
    arena: int  # elements
    slots: list[Slot]


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def plan_memory(sizes: list[tuple[int, int]], slack: int = 0) -> MemoryPlan:
    """``sizes``: ``(input elements, output elements)`` per layer, in order. ``slack``: elements
    past the end that a kernel may read but never uses (q15: a partial group's padding lanes,
    which weigh 0)."""
    last = len(sizes) - 1
    need = []
    for i, (n_in, n_out) in enumerate(sizes):
        need.append((_aligned(n_in) if i > 0 else 0) + (_aligned(n_out) if i < last else 0))
    arena = max(need, default=0)
    slots: list[Slot] = []
    low = True  # where the next output goes
    previous: int | None = None
    for i, (n_in, n_out) in enumerate(sizes):
        out_offset = None
        if i < last:
            out_offset = 0 if low else arena - _aligned(n_out)
            low = not low
        slots.append(Slot(previous, out_offset, need[i]))
        previous = out_offset
    return MemoryPlan(arena + (_aligned(slack) if arena else 0), slots)
