"""The CSV contract of ``gradconflict solve``: a K x K Gram matrix in one of three layouts.

(a) plain: K rows of K numbers, no labels (``np.savetxt(path, G, delimiter=",")``); tasks are named 0..K-1.
(b) labelled: a header row of K labels AND an index column of the same K labels, the corner cell empty or text
    (``pd.DataFrame(G, index=labels, columns=labels).to_csv(path)``, as ``gradconflict gram`` writes).
(c) header only: a row of K labels over K rows of K numbers (``DataFrame.to_csv(path, index=False)``).

Labels that are all numbers must be integers (``0, 1, 2`` as pandas writes a default index): a row of
non-integer numbers is data, not labels. Cells are separated by ``,``, ``;`` or a tab (or, in a file with none
of them, by spaces); a UTF-8 or UTF-16 byte-order mark, CRLF line ends, blank lines, spaces around cells, quoted
cells and np.savetxt's ``# `` before a header are fine. Everything else is refused with a ``ValueError`` that names
the file, the shape read and how to write a valid file -- in particular a file that reads two ways: a
symmetric matrix whose cell [0, 0] is empty looks like labels (its first row) over a (K-1) x (K-1) matrix, and
integer labels with a number in the corner look like a (K+1) x (K+1) matrix. NaN and Inf cells are read as
numbers, so that the solver refuses them by position.
"""

from __future__ import annotations

import codecs
import csv
import io
import re
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd

__all__ = ["read_gram", "LAYOUTS", "HOW_TO_WRITE"]

LAYOUTS = ("plain K x K numbers; a header row of K labels over K rows of numbers; or a header row and an index "
           "column of the same K labels (as `gradconflict gram` and DataFrame.to_csv write)")
HOW_TO_WRITE = ('write it with pd.DataFrame(G, index=labels, columns=labels).to_csv(path) or '
                'np.savetxt(path, G, delimiter=",")')

_NUMBER = re.compile(r"[+-]?(?:(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|nan|inf|infinity)\Z", re.IGNORECASE)
_NOT_IN_NUMBERS = re.compile(r"[^0-9eE.+\-nNaAiIfFtTyY]")  # a character no number token holds
_INTEGER = re.compile(r"[+-]?\d+\Z")
_SEPARATORS = {",": "comma", ";": "semicolon", "\t": "tab", None: "space", "\x00": "un"}  # "\x00": a line is a cell


class _Refused(ValueError):
    """A file that fits no layout of the contract (or fits two)."""


def _text(path: str) -> str:
    """The file's text: UTF-8 (with or without BOM) or UTF-16 with BOM; refuses an empty or binary file."""
    data = Path(path).read_bytes()
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            text = data.decode("utf-16")
        except UnicodeDecodeError:
            raise ValueError(f"{path}: starts with a UTF-16 byte-order mark but is not UTF-16 text; "
                             f"{HOW_TO_WRITE}") from None
    else:
        if b"\x00" in data:
            raise ValueError(f"{path}: is a binary file (it holds NUL bytes), not a CSV text file; {HOW_TO_WRITE}")
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}: is not UTF-8 text (undecodable byte at offset {err.start}: a binary "
                             f"file?); {HOW_TO_WRITE}") from None
    if "\x00" in text:
        raise ValueError(f"{path}: holds NUL characters: a binary file, not a CSV text file; {HOW_TO_WRITE}")
    if not text.strip():
        raise ValueError(f"{path}: the file is empty; a Gram CSV holds a K x K matrix: {HOW_TO_WRITE}")
    return text


def _rows(text: str, sep: Optional[str]) -> list[list[str]]:
    """Cells of the non-blank lines, stripped of surrounding spaces (``sep=None``: split on runs of spaces)."""
    text = re.sub(r"\A(\s*)# *", r"\1", text)  # np.savetxt(header=...) writes "# " before the header
    if sep is None:  # runs of spaces, quotes as in a CSV
        lines = "\n".join(line.strip() for line in text.splitlines())
        rows = list(csv.reader(io.StringIO(lines, newline=""), delimiter=" ", skipinitialspace=True))
    else:
        rows = list(csv.reader(io.StringIO(text, newline=""), delimiter=sep, skipinitialspace=True))
    pad = " " if sep == "\x00" else " \t"  # one cell a line: a tab is no padding but a separator refused
    rows = [[cell.strip(pad) for cell in row] for row in rows]
    rows = [row for row in rows if len(row) > 1 or (row and row[0])]  # drop blank lines
    return rows


def _cells(cells: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(repr(c) for c in cells[:limit])
    return shown + (", ..." if len(cells) > limit else "")


def _unique(labels: list[str]) -> list[str]:
    """Task names as given, with a repeated name numbered (``a``, ``a.1``, ...) so no weight is lost by name."""
    taken = set(labels)
    seen: dict[str, int] = {}
    out = []
    for name in labels:
        n = seen.get(name, 0)
        seen[name] = n + 1
        if n:
            while f"{name}.{n}" in taken:
                n += 1
            taken.add(f"{name}.{n}")
        out.append(name if n == 0 else f"{name}.{n}")
    return out


def _values(rows: list[list[str]]) -> Optional[np.ndarray]:
    """The cells as a float64 matrix when every one is a number token (``_NUMBER``), else None.

    Fast path for large files: only number characters, then ``float`` (which, on those characters, accepts
    exactly the tokens ``_NUMBER`` does)."""
    cells = [c for row in rows for c in row]
    if not cells:
        return np.zeros((len(rows), 0))
    if _NOT_IN_NUMBERS.search("".join(cells)):
        return None
    try:
        return np.fromiter(map(float, cells), dtype=np.float64, count=len(cells)).reshape(len(rows), -1)
    except ValueError:  # an empty cell, or number characters that make no number
        return None


def _bad_cells(rows: list[list[str]], di: int = 0, dj: int = 0) -> list[str]:
    """``'x' at [i + di, j + dj]`` for each cell ``rows[i][j]`` that is not a number (for messages)."""
    return [f"{'empty' if not c else repr(c)} at [{i + di}, {j + dj}]"
            for i, row in enumerate(rows) for j, c in enumerate(row) if not _NUMBER.match(c)]


def _frame(values: np.ndarray, labels: list[str]) -> pd.DataFrame:
    labels = _unique(labels)
    return pd.DataFrame(values, index=labels, columns=labels)


def _where(bad: list[str], limit: int = 3) -> str:
    return ", ".join(bad[:limit]) + (f" and {len(bad) - limit} more" if len(bad) > limit else "")


def _empty_label(labels: list[str], where: str) -> Optional[str]:
    empty = [i for i, label in enumerate(labels) if not label]
    return f"the {where} has an empty label (task {empty[0]})" if empty else None


def _float_labels(labels: list[str]) -> bool:
    """Numbers that are not all integers: a row of data, not labels (pandas writes a default index as 0, 1, ...)."""
    return all(_NUMBER.match(label) for label in labels) and not all(_INTEGER.match(label) for label in labels)


def _label_like(cells: Sequence[str]) -> bool:
    """Distinct integers (as pandas writes a default index): a row or column that could be task labels."""
    return bool(cells) and all(_INTEGER.match(c) for c in cells) and len(set(cells)) == len(cells)


def _integer_free(rows: list[list[str]]) -> bool:
    return any(not _INTEGER.match(c) for row in rows for c in row)


def _looks_labelled(rows: list[list[str]]) -> Optional[str]:
    """Why an all-numeric K x K table also reads as integer labels over a smaller matrix, else None.

    The first row (or column) after cell [0, 0] looks like labels when it holds distinct integers while the rest
    holds a non-integer number (K >= 3), or when it cannot be a Gram row: |G_0i|^2 > G_00 G_ii."""
    header, index = rows[0][1:], [row[0] for row in rows[1:]]
    head_like, index_like = _label_like(header), _label_like(index)
    if not (head_like or index_like):
        return None
    G = np.array(rows, dtype=np.float64)
    diag = np.diag(G)
    with np.errstate(invalid="ignore", over="ignore"):
        # not <=: a NaN there counts as no Gram row either
        no_gram_row = bool(np.any(~(G[0, 1:] ** 2 <= diag[0] * diag[1:])) or np.any(~(G[1:, 0] ** 2 <= diag[0] * diag[1:])))
    if not (no_gram_row or (len(rows) >= 3 and _integer_free([row[1:] for row in rows[1:]]))):
        return None
    which = "row and column look" if head_like and index_like else "row looks" if head_like else "column looks"
    cells = header if head_like else index
    return (f"reads two ways: the first {which} like integer labels ({_cells(cells)}) over a "
            f"{len(rows) - 1} x {len(rows) - 1} matrix, with the number {rows[0][0]!r} in the corner cell, so the file is "
            f"also a {len(rows)} x {len(rows)} matrix with a fake task; leave the corner empty or write text there "
            f"(e.g. 'bin'), or drop the labels")


def _parse(rows: list[list[str]], path: str, sep: Optional[str]) -> pd.DataFrame:
    """The one layout of the contract that fits a table of cells, else ``_Refused`` saying why."""
    name = _SEPARATORS[sep]
    widths = [len(row) for row in rows]
    R, C = len(rows), max(widths)
    tail = f"read {R} row(s) x {C} {name}-separated column(s); accepted layouts: {LAYOUTS}; {HOW_TO_WRITE}"
    if min(widths) != C:
        short = next(i for i, w in enumerate(widths) if w != C)
        raise _Refused(f"{path}: row {short + 1} of the table has {widths[short]} {name}-separated cell(s) but "
                       f"another has {C}: every row needs the same number of cells; {tail}")
    if R == C:
        corner, header, index = rows[0][0], rows[0][1:], [row[0] for row in rows[1:]]
        body = [row[1:] for row in rows[1:]]
        values = _values(body)
        edge = _values([[corner, *header, *index]])
        if values is not None and edge is not None:  # (a) plain
            why = _looks_labelled(rows) if R > 1 else None
            if why:
                raise _Refused(f"{path}: {why}; {tail}")
            return _frame(_values(rows), [str(i) for i in range(R)])
        bad = _bad_cells(rows)
        if R > 1 and not _NUMBER.match(corner):  # (b) labelled: the corner is empty or text
            if _float_labels(header) or _float_labels(index):
                numbers = header if _float_labels(header) else index
                raise _Refused(
                    f"{path}: the first {'row' if numbers is header else 'column'} holds numbers ({_cells(numbers)}),"
                    f" not labels (numbers as labels must be integers), so this is a plain {R} x {R} matrix with "
                    f"cells that are not numbers ({_where(bad)}); every cell must be a number; {tail}")
            why = _empty_label(header, "header row") or _empty_label(index, "index column")
            if why:
                raise _Refused(f"{path}: {why}; {tail}")
            if header != index:
                i = next(i for i, (h, x) in enumerate(zip(header, index)) if h != x)
                raise _Refused(f"{path}: the header labels and the index labels disagree (task {i}: {header[i]!r} "
                               f"in the header, {index[i]!r} in the index); write the same K labels in both, as "
                               f"DataFrame.to_csv does; {tail}")
            if values is None:
                raise _Refused(f"{path}: the {R - 1} x {R - 1} matrix has non-numeric or empty entries "
                               f"({_where(_bad_cells(body))}); every cell must be a number; {tail}")
            return _frame(values, header)
        hint = ""
        if R > 1 and header == index and all(header) and not _float_labels(header):
            hint = (f"; if the first row and column are labels, the corner cell must be empty or text, not the "
                    f"number {corner!r}")
        raise _Refused(f"{path}: the {R} x {R} matrix has non-numeric or empty entries ({_where(bad)}); every cell "
                       f"must be a number{hint}; {tail}")
    if R == C + 1:  # (c) header only
        why = _empty_label(rows[0], "header row")
        if why:
            raise _Refused(f"{path}: {why}; {tail}")
        if _float_labels(rows[0]):
            raise _Refused(f"{path}: the first row holds numbers ({_cells(rows[0])}), not labels (numbers as labels "
                           f"must be integers), so the file has {R} rows of {C} numbers: one too many; {tail}")
        values = _values(rows[1:])
        if values is None:
            raise _Refused(f"{path}: the {C} x {C} matrix under the header has non-numeric or empty entries "
                           f"({_where(_bad_cells(rows[1:]))}); every cell must be a number; {tail}")
        index = [row[0] for row in rows[1:]]
        if C >= 2 and _label_like(index) and _integer_free([row[1:] for row in rows[1:]]):
            raise _Refused(f"{path}: reads two ways: the first column ({_cells(index)}) looks like an index of "
                           f"integer labels, but the header row has {C} cells, not {C + 1}, so a column is missing "
                           f"or the index is data; {tail}")
        return _frame(values, rows[0])
    first = ",".join(rows[0])
    raise _Refused(f"{path}: expected a square K x K matrix (K + 1 rows with a header) but parsed {R} row(s) x {C} "
                   f"{name}-separated column(s) (first row: {first[:60]!r}); accepted layouts: {LAYOUTS}; "
                   f"{HOW_TO_WRITE}")


def _same(a: pd.DataFrame, b: pd.DataFrame) -> bool:
    return a.shape == b.shape and list(a.index) == list(b.index) and bool(
        np.array_equal(a.to_numpy(), b.to_numpy(), equal_nan=True))


def read_gram(path: str) -> pd.DataFrame:
    """Read a K x K Gram CSV under the contract of this module (plain, labelled, or header only).

    Returns a float64 DataFrame with the task names as index and columns (0..K-1 for a plain file). NaN and
    Inf cells are kept (the solver refuses them by position). Raises ``ValueError`` naming the file, the shape
    read and how to write a valid file when the file fits no layout, or fits two.
    """
    if Path(path).is_dir():  # e.g. the folder `gradconflict gram` wrote: its gram.csv is the file
        hint = f"; pass {Path(path) / 'gram.csv'}" if (Path(path) / "gram.csv").is_file() else ""
        raise ValueError(f"{path} is a folder, not a Gram CSV file{hint}")
    text = _text(str(path))
    counts = {sep: text.count(sep) for sep in (",", ";", "\t")}
    # the separators in the file, most frequent first, else spaces; then one cell a line (K = 1 needs none)
    present: list[Optional[str]] = sorted((s for s in counts if counts[s]), key=lambda s: -counts[s]) or [None]
    refusals: list[ValueError] = []
    for seps in (present, ["\x00"]):
        read: list[tuple[Optional[str], pd.DataFrame]] = []
        for sep in seps:
            try:
                read.append((sep, _parse(_rows(text, sep), str(path), sep)))
            except _Refused as err:
                refusals.append(err)
            except csv.Error as err:
                refusals.append(ValueError(f"{path}: not a readable CSV with {_SEPARATORS[sep]} separators "
                                           f"({err}); {HOW_TO_WRITE}"))
        if read and all(_same(read[0][1], frame) for _, frame in read[1:]):
            return read[0][1]
        if read:
            ways = " and ".join(f"{len(f)} x {len(f)} with {_SEPARATORS[s]} separators" for s, f in read)
            raise ValueError(f"{path}: reads two ways ({ways}); use one separator, e.g. {HOW_TO_WRITE}")
    raise refusals[0]
