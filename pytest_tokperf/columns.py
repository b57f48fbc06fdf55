"""Aligned text tables, and fitting one into a terminal line.

The terminal summary's table has a dozen columns and test ids of 80 characters, over
200 characters a row: on an ordinary terminal every row wraps. `fit` makes it fit
`WIDTH` characters, losing the least first: columns that repeat another, the test ids'
directories and files (their names tell the tests apart), the optional columns in
order (cells stay whole: a number cut short misleads), and only then characters of the
widest cells, which a table whose cells are all short never needs. The last column
(the verdict) is never cut, and one footnote names what was left out.
"""

from __future__ import annotations

from collections.abc import Sequence

WIDTH = 120  # characters a line of the narrow table holds at most
GAP = "  "  # between columns
MORE = "-v or --tokperf-table wide shows "  # the footnote of a narrowed table

Column = tuple[list[str], bool]  # its cells, the header first; right-aligned (numbers)


def aligned(rows: Sequence[Sequence[str]], right: set[int]) -> list[str]:
    """Columns padded to their widest cell; numbers (the `right` columns) right-aligned."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [
        GAP.join(
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ).rstrip()
        for r in rows
    ]


def fit(
    rows: Sequence[Sequence[str]],
    right: set[int],
    limit: int = WIDTH,
    optional: Sequence[str] = (),
    repeats: Sequence[str] = (),
) -> list[str]:
    """`rows` (the header first; column 0 the test ids, the last the verdicts) aligned in
    at most `limit` characters a line, then a footnote naming what was left out.

    While the table is too wide it drops the `repeats` columns whose every cell repeats
    another column's (nothing is lost), then the test ids' directories, then their files
    where the tests' names alone are unique, then the `optional` columns in their order,
    then a character at a time from the widest cell but the verdict's: test ids lose
    their middle, other cells their end (`…`).
    """
    columns: list[Column] = [(list(c), i in right) for i, c in enumerate(zip(*rows, strict=True))]
    left_out: list[str] = []  # what the footnote names, once each

    def leave(what: str) -> None:
        left_out.extend([] if what in left_out else [what])

    def drop(name: str) -> None:
        columns[:] = [c for c in columns if c[0][0] != name]
        leave(name)

    for name in repeats:
        if _width(columns) > limit and _repeated(columns, name):
            drop(name)
    for shorten in (_files, _names):
        ids = columns[0][0]
        if _width(columns) > limit and ids[1:] != (short := shorten(ids[1:])):
            columns[0] = ([ids[0], *short], False)
            leave("whole test ids")
    for name in optional:
        if _width(columns) > limit and any(c[0][0] == name for c in columns):
            drop(name)
    for i, width in enumerate(_squeezed(columns, limit)):
        cells, numbers = columns[i]
        if width < max(map(len, cells)):
            cut = _middle if i == 0 else _end
            columns[i] = ([cut(c, width) for c in cells], numbers)
            leave("whole test ids" if i == 0 else f"whole {cells[0]} cells")
    table = list(zip(*(cells for cells, _ in columns), strict=True))
    lines = aligned(table, {i for i, (_, numbers) in enumerate(columns) if numbers})
    return lines + ([_footnote(left_out, limit)] if left_out else [])


def _footnote(left_out: Sequence[str], limit: int) -> str:
    """The line naming what the narrow table left out, as many as fit in `limit`."""
    for shown in range(len(left_out), 0, -1):
        more = len(left_out) - shown
        line = MORE + ", ".join(left_out[:shown]) + (f" and {more} more" if more else "")
        if len(line) <= limit:
            return line
    return MORE + "the whole table"


def _width(columns: Sequence[Column]) -> int:
    """The width of the aligned columns' longest line."""
    return sum(max(map(len, c)) for c, _ in columns) + len(GAP) * (len(columns) - 1)


def _repeated(columns: Sequence[Column], name: str) -> bool:
    """Whether the column `name` repeats another column in every row (its header aside)."""
    mine = [c[1:] for c, _ in columns if c[0] == name]
    return bool(mine) and any(c[0] != name and c[1:] == mine[0] for c, _ in columns)


def _files(nodeids: Sequence[str]) -> list[str]:
    """Test ids without their directories: examples/test_x.py::t -> test_x.py::t."""
    out = []
    for nodeid in nodeids:
        path, sep, rest = nodeid.partition("::")
        out.append(path.rpartition("/")[2] + sep + rest)
    return out


def _names(nodeids: Sequence[str]) -> list[str]:
    """The tests' names alone (test_x.py::test_y -> test_y) where they tell the tests
    apart; the ids as they are where two tests share a name."""
    names = [nodeid.rpartition("::")[2] for nodeid in nodeids]
    return names if len(set(names)) == len(names) else list(nodeids)


def _squeezed(columns: Sequence[Column], limit: int) -> list[int]:
    """Each column's width once the widest, but the last, lose a character at a time
    until the table fits `limit` (or every one of them is down to one character)."""
    widths = [max(map(len, c)) for c, _ in columns]
    excess = _width(columns) - limit
    while excess > 0:
        widest = max(range(len(widths) - 1), key=lambda k: widths[k], default=None)
        if widest is None or widths[widest] <= 1:
            break
        widths[widest] -= 1
        excess -= 1
    return widths


def _middle(text: str, width: int) -> str:
    """`text` in `width` characters, its middle replaced by `…`; a third from its start
    and the rest from its end (a test id's end is the test's name)."""
    if len(text) <= width:
        return text
    head = (width - 1) // 3
    return text[:head] + "…" + text[len(text) - (width - 1 - head) :]


def _end(text: str, width: int) -> str:
    """`text` in `width` characters, its end replaced by `…`."""
    return text if len(text) <= width else text[: width - 1] + "…"
