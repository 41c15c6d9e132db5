"""Plain-text tables for the core CLI.

The storage-node CLI must not pull a terminal-UI stack (the core depends on torch, numpy, nixl,
msgpack, xxhash and pydantic only), and its output is read by people and by ``grep`` alike, so
it prints aligned columns and nothing else.
"""

from __future__ import annotations

from typing import Sequence, TextIO


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]], title: str | None = None,
                 right: Sequence[str] = ()) -> str:
    """Columns padded to their widest cell; columns named in ``right`` are right-aligned."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if h in right else v.ljust(w) for v, w, h in zip(values, widths, headers)).rstrip()

    out = [title] if title else []
    out += [line(list(headers)), line(["-" * w for w in widths])]
    out += [line(r) for r in cells]
    return "\n".join(out)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]], title: str | None = None,
                right: Sequence[str] = (), file: TextIO | None = None) -> None:
    print(format_table(headers, rows, title, right), file=file)
