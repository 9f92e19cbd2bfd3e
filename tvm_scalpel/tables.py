"""Plain-text tables, as the command line, the demo and the benchmarks print them."""

from __future__ import annotations


def format_table(headers: list[str], rows: list[list[object]]) -> str:
    """Columns padded to their widest cell; the first left-aligned, the others right-aligned."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]

    def line(r: list[str]) -> str:
        return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells])
