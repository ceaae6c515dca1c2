"""The CSV contract of ``gradconflict solve`` (gradconflict.cli.gram_csv, issue #15).

A Gram CSV is plain (K x K numbers), labelled (header row and index column of the same K labels, corner empty
or text) or header only; it round-trips exactly, or it is refused with a ValueError naming the file, the shape
read and how to write it -- never read as a different matrix. The references are the matrices and labels the
tests wrote (numpy / pandas writers), not the reader.
"""

from __future__ import annotations

import codecs
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from gradconflict.cli import main
from gradconflict.cli.solve import read_gram

G = np.array([[2.0, 0.5, 0.1], [0.5, 1.0, 0.2], [0.1, 0.2, 3.0]])
HOW = "to_csv(path) or np.savetxt(path, G, delimiter=\",\")"


def _refused(path: Path, *needles: str) -> str:
    with pytest.raises(ValueError) as info:
        read_gram(str(path))
    message = str(info.value)
    assert message.startswith(f"{path}:") and "\n" not in message
    for needle in needles:
        assert needle in message, message
    return message


def _solve(path: Path, capsys, *flags: str) -> tuple[int, str, str]:
    code = main(["solve", str(path), *flags])
    out = capsys.readouterr()
    return code, out.out, out.err


# ----------------------------------------------------------------- issue case 1: task 0 must not disappear

@pytest.mark.parametrize("cell", ["", "abc"])
def test_plain_matrix_with_a_bad_corner_is_refused_not_read_as_labels(tmp_path: Path, cell: str, capsys) -> None:
    """pandas writes NaN as an empty cell: a plain 3 x 3 file with G[0,0] missing was read as a 2 x 2 matrix
    labelled '0.5', '0.1' (task 0 gone) and solved with exit 0."""
    path = tmp_path / "g.csv"
    bad = G.astype(object)
    bad[0, 0] = cell
    pd.DataFrame(bad).to_csv(path, header=False, index=False)
    _refused(path, "3 x 3", "[0, 0]", "read 3 row(s) x 3 comma-separated column(s)", HOW)
    code, out, err = _solve(path, capsys)
    assert code == 2 and out == "" and err.startswith("gradconflict solve: error: ") and err.count("\n") == 1


@pytest.mark.parametrize("where", [(0, 1), (1, 0), (0, 2)])
def test_plain_matrix_with_an_empty_cell_in_the_first_row_or_column_is_refused(tmp_path: Path, where) -> None:
    path = tmp_path / "g.csv"
    bad = G.copy()
    bad[where] = bad[where[::-1]] = np.nan  # symmetric NaN, written as empty cells
    pd.DataFrame(bad).to_csv(path, header=False, index=False)
    _refused(path, f"empty at [{where[0]}, {where[1]}]", "3 x 3")


# ----------------------------------------------------------------- issue case 2: no fake task, no silent index

def test_integer_labels_with_a_numeric_corner_are_refused_not_read_as_a_fake_task(tmp_path: Path, capsys) -> None:
    path = tmp_path / "g.csv"
    pd.DataFrame(G).to_csv(path, index_label="0")  # corner '0', labels 0, 1, 2: was a 4 x 4 matrix
    _refused(path, "reads two ways", "fake task", "'0', '1', '2'", "read 4 row(s) x 4")
    assert _solve(path, capsys)[0] == 2


def test_header_and_index_labels_that_disagree_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "g.csv"
    pd.DataFrame(G, index=["x", "b", "c"], columns=["a", "b", "c"]).to_csv(path)  # the index won silently
    _refused(path, "disagree", "task 0: 'a' in the header, 'x' in the index")


def test_a_truncated_header_only_file_is_not_read_as_a_plain_matrix(tmp_path: Path) -> None:
    path = tmp_path / "g.csv"
    pd.DataFrame(G).to_csv(path, index=False)
    path.write_text("\n".join(path.read_text().splitlines()[:-1]) + "\n")  # the last row lost: 3 x 3 cells
    _refused(path, "reads two ways", "integer labels")


def test_a_labelled_file_missing_a_column_is_not_read_as_header_only(tmp_path: Path) -> None:
    path = tmp_path / "g.csv"
    pd.DataFrame(G, index=pd.RangeIndex(3, name="bin")).to_csv(path, columns=[0, 1])  # 4 rows x 3 columns
    _refused(path, "looks like an index", "read 4 row(s) x 3")


# ----------------------------------------------------------------- every writer round-trips

def _gram(K: int, seed: int) -> np.ndarray:
    A = np.random.default_rng(seed).normal(size=(K, K + 1)) * 10.0 ** np.random.default_rng(seed).integers(-8, 8)
    return A @ A.T


@pytest.mark.parametrize("K", [1, 2, 5])
@pytest.mark.parametrize("writer", ["savetxt", "savetxt_space", "savetxt_tab", "savetxt_header", "to_csv",
                                    "to_csv_default_labels", "to_csv_index_false", "to_csv_semicolon"])
def test_writers_round_trip_exactly(tmp_path: Path, K: int, writer: str) -> None:
    path = tmp_path / "g.csv"
    M = _gram(K, K)
    labels = [f"{t}-{t + 99}" for t in range(0, 100 * K, 100)]  # BinSpec labels, as `gradconflict gram` writes
    frame = pd.DataFrame(M, index=pd.Index(labels, name="bin"), columns=labels)
    expected = labels
    if writer == "savetxt":
        np.savetxt(path, M, delimiter=",")
        expected = [str(i) for i in range(K)]
    elif writer == "savetxt_space":
        np.savetxt(path, M)
        expected = [str(i) for i in range(K)]
    elif writer == "savetxt_tab":
        np.savetxt(path, M, delimiter="\t")
        expected = [str(i) for i in range(K)]
    elif writer == "savetxt_header":
        np.savetxt(path, M, delimiter=",", header=",".join(labels))  # "# " before the header
    elif writer == "to_csv":
        frame.to_csv(path)
    elif writer == "to_csv_default_labels":
        pd.DataFrame(M).to_csv(path)
        expected = [str(i) for i in range(K)]
    elif writer == "to_csv_index_false":
        frame.to_csv(path, index=False)
    else:
        frame.to_csv(path, sep=";")
    got = read_gram(str(path))
    assert list(got.index) == expected and list(got.columns) == expected
    assert np.array_equal(got.to_numpy(), M)  # exact, bit for bit


def test_the_csv_gradconflict_gram_writes_round_trips(tmp_path: Path) -> None:
    from gradconflict._io import write_csv
    from gradconflict.bins import TimestepBins

    labels = TimestepBins.uniform(1000, 4).labels
    assert labels == ["0-249", "250-499", "500-749", "750-999"]
    M = _gram(4, 7)
    write_csv(pd.DataFrame(M, index=pd.Index(labels, name="bin"), columns=labels), tmp_path / "gram.csv", index=True)
    got = read_gram(str(tmp_path / "gram.csv"))
    assert list(got.index) == labels and np.array_equal(got.to_numpy(), M)


# ----------------------------------------------------------------- unclear failures of `solve`

@pytest.mark.parametrize("value", [np.inf, np.nan])
def test_lam_rel_with_a_non_finite_diagonal_names_the_entry_of_g(tmp_path: Path, value: float, capsys) -> None:
    path = tmp_path / "g.csv"
    bad = G.copy()
    bad[1, 1] = value
    np.savetxt(path, bad, delimiter=",")
    code, out, err = _solve(path, capsys, "--lam-rel", "0.1")
    assert code == 2 and out == ""
    assert f"{path}: G contains non-finite values ({'NaN' if np.isnan(value) else 'inf'} at [1, 1])" in err
    assert "lam must be finite" not in err and err.count("\n") == 1


@pytest.mark.parametrize("content, needle", [(b"", "the file is empty"), (b"\n \r\n", "the file is empty"),
                                             (b"\x93NUMPY\x01\x00v\x00", "binary"), (b"\xff\xd8\xff\xe0", "UTF-8")])
def test_an_empty_or_binary_file_is_named(tmp_path: Path, content: bytes, needle: str, capsys) -> None:
    path = tmp_path / "g.csv"
    path.write_bytes(content)
    code, out, err = _solve(path, capsys)
    assert code == 2 and out == "" and f"{path}: " in err and needle in err and err.count("\n") == 1


def test_unconverged_ugd_prints_a_hint_naming_max_iter_and_lr(tmp_path: Path, capsys) -> None:
    path = tmp_path / "g.csv"
    np.savetxt(path, G, delimiter=",")
    code, out, err = _solve(path, capsys, "--method", "ugd", "--max-iter", "5", "--json")
    assert code == 0 and json.loads(out)["converged"] is False  # stdout stays one JSON object
    assert "hint:" in err and "--max-iter (now 5)" in err and "--lr" in err and err.count("\n") == 1
    code, out, err = _solve(path, capsys, "--method", "ugd", "--max-iter", "5000", "--lr", "0.05")
    assert code == 0 and "converged: True" in out and err == ""


def test_lr_changes_ugd_like_the_library_call(tmp_path: Path, capsys) -> None:
    from gradconflict.pareto import solve

    path = tmp_path / "g.csv"
    np.savetxt(path, G, delimiter=",")
    code, out, _ = _solve(path, capsys, "--method", "ugd", "--max-iter", "20", "--lr", "0.3", "--json")
    ref = solve(G, 0.0, "ugd", steps=20, lr=0.3)  # the CLI flags map onto these options
    assert code == 0 and list(json.loads(out)["weights"].values()) == pytest.approx(ref.weights, abs=1e-12)
    assert ref.weights != pytest.approx(solve(G, 0.0, "ugd", steps=20).weights, abs=1e-6)


@pytest.mark.parametrize("flags, needle", [
    (["--lr", "0.1"], "--lr applies to --method ugd only"),
    (["--variant", "away"], "--variant applies to --method frank_wolfe only"),
    (["--solver", "SCS"], "--solver applies to --method cvxpy only"),
    (["--method", "ugd", "--lr", "0"], "--lr must be a positive finite number"),
    (["--method", "ugd", "--max-iter", "-1"], "--max-iter must be >= 1"),
    (["--tol", "nan"], "--tol must be a finite number >= 0"),
])
def test_flags_a_method_cannot_use_are_named(tmp_path: Path, flags: list, needle: str, capsys) -> None:
    path = tmp_path / "g.csv"
    np.savetxt(path, G, delimiter=",")
    code, out, err = _solve(path, capsys, *flags)
    assert code == 2 and out == "" and needle in err and err.count("\n") == 1


# ----------------------------------------------------------------- properties over random layouts

LABEL = st.text(st.sampled_from("abtxyz_-0123456789 ,;\"'"), min_size=1, max_size=6).map(str.strip).filter(bool)
FLOAT = st.floats(allow_nan=False, allow_infinity=False, width=64) | st.sampled_from([np.nan, np.inf, -np.inf])
SEPARATORS = [",", ";", "\t"]
LAYOUTS = ["plain", "labelled", "labelled_named", "header"]
# junk for a matrix cell: not a number (so must be refused), or a number token with its value
JUNK = st.sampled_from(["", " ", "abc", "1,5", "1.5.2", "0x10", "1_0", "--1", "e5", "na", "inf inf", "١", "None"])
NUMBER_TOKENS = st.sampled_from(["nan", "NaN", "-inf", "Infinity", "+.5e3", "1E-320", "-0.0"])


@st.composite
def gram_files(draw):
    K = draw(st.integers(1, 5))
    M = np.array(draw(st.lists(FLOAT, min_size=K * K, max_size=K * K)), dtype=np.float64).reshape(K, K)
    layout = draw(st.sampled_from(LAYOUTS))
    labels = draw(st.lists(LABEL, min_size=K, max_size=K, unique=True)) if draw(st.booleans()) else None
    if labels is not None and all(l.lstrip("+-").isdigit() for l in labels):
        labels = None  # integer labels: drawn below as pandas' default 0..K-1
    return M, layout, labels, draw(st.sampled_from(SEPARATORS))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _cells(M: np.ndarray, layout: str, labels, sep: str) -> tuple[list[list[str]], list[str], int, int]:
    """The table a writer makes, the labels a reader must return, and the row / column of matrix cell [0, 0]."""
    K = len(M)
    body = [[repr(float(x)) for x in row] for row in M]
    if layout == "plain":
        return body, [str(i) for i in range(K)], 0, 0
    names = labels if labels is not None else [str(i) for i in range(K)]
    if layout == "header":
        return [names, *body], names, 1, 0
    corner = "bin" if layout == "labelled_named" else ""
    return [[corner, *names], *[[n, *row] for n, row in zip(names, body)]], names, 1, 1


def _write(path: Path, table: list[list[str]], sep: str, bom: bool, crlf: bool, pad: str, blank: bool) -> None:
    def quote(cell: str) -> str:
        return '"' + cell.replace('"', '""') + '"' if any(c in cell for c in f'"{sep}') else cell

    newline = "\r\n" if crlf else "\n"
    lines = [sep.join(pad + quote(c) + pad for c in row) for row in table]
    if blank:
        lines.insert(len(lines) // 2 + 1, "")
    path.write_bytes((codecs.BOM_UTF8 if bom else b"") + (newline.join(lines) + newline).encode())


FORMAT = dict(bom=st.booleans(), crlf=st.booleans(), pad=st.sampled_from(["", " ", "  "]), blank=st.booleans())
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _labels_ok(labels) -> bool:
    """Labels the contract reads as labels: not all of them numbers unless integers (those are data)."""
    return labels is None or not all(_is_number(l) for l in labels) or all(l.lstrip("+-").isdigit() for l in labels)


@SETTINGS
@given(case=gram_files(), **FORMAT)
def test_property_valid_files_round_trip_exactly(tmp_path: Path, case, bom, crlf, pad, blank) -> None:
    M, layout, labels, sep = case
    assume(_labels_ok(labels))
    table, names, _, _ = _cells(M, layout, labels, sep)
    path = tmp_path / "g.csv"
    _write(path, table, sep, bom, crlf, pad, blank)
    got = read_gram(str(path))
    assert list(got.index) == names and list(got.columns) == names
    assert np.array_equal(got.to_numpy(), M, equal_nan=True)


@SETTINGS
@given(case=gram_files(), **FORMAT, hits=st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4), JUNK | NUMBER_TOKENS),
                                                  min_size=1, max_size=3))
def test_property_a_corrupted_matrix_cell_is_refused_or_read_as_written(tmp_path: Path, case, bom, crlf, pad,
                                                                         blank, hits) -> None:
    """Junk in matrix cells is refused; a number token there is read as that number; nothing else changes."""
    M, layout, labels, sep = case
    assume(_labels_ok(labels))
    table, names, r0, c0 = _cells(M, layout, labels, sep)
    expected = M.copy()
    K = len(M)
    final = {(i % K, j % K): token for i, j, token in hits}  # a later hit of the same cell overwrites
    # an empty cell alone on its row is a blank line, which is skipped: that is a missing row (the next test)
    assume(not (len(table[0]) == 1 and any(not token.strip() for token in final.values())))
    junk = False
    for (i, j), token in final.items():
        table[r0 + i][c0 + j] = token
        if _is_number(token) and token.strip() == token and "_" not in token and token.isascii():
            expected[i, j] = float(token)
        else:
            junk = True
    got = _read_or_refused(tmp_path / "g.csv", table, sep, bom, crlf, pad, blank)
    if got is None:
        return
    assert not junk, f"junk cell read as a matrix: {got}"
    assert list(got.index) == names
    assert np.array_equal(got.to_numpy(), expected, equal_nan=True)


def _read_or_refused(path: Path, table, sep, bom, crlf, pad, blank):
    """The matrix read from the written file, or None when it is refused (the message must name the file)."""
    _write(path, table, sep, bom, crlf, pad, blank)
    try:
        return read_gram(str(path))
    except ValueError as err:
        assert str(err).startswith(f"{path}:")
        return None


@SETTINGS
@given(case=gram_files(), **FORMAT, cut=st.sampled_from(["row", "column"]), at=st.integers(0, 5))
def test_property_a_file_missing_a_row_or_column_is_never_a_different_matrix(tmp_path: Path, case, bom, crlf,
                                                                              pad, blank, cut, at) -> None:
    """Dropping one row or column of a valid file leaves it refused, or the same matrix: with the same labels
    (the index column of a labelled file dropped) or 0..K-1 (the header of a header-only file dropped)."""
    M, layout, labels, sep = case
    # K = 1 is left out: a one-cell file ("0") or a header over one cell ("bin" over "0") is what a cut K = 1
    # file becomes, and both are valid files (the cut is indistinguishable from a file written that way)
    assume(_labels_ok(labels) and len(M) >= 2)
    table, names, _, _ = _cells(M, layout, labels, sep)
    at = at % (len(table) if cut == "row" else len(table[0]))
    table = [row for i, row in enumerate(table) if i != at] if cut == "row" else [
        [c for j, c in enumerate(row) if j != at] for row in table]
    assume(table and table[0])
    got = _read_or_refused(tmp_path / "g.csv", table, sep, bom, crlf, pad, blank)
    if got is None:
        return
    default = [str(i) for i in range(len(M))]
    assert list(got.index) in (names, default) and np.array_equal(got.to_numpy(), M, equal_nan=True), (table, got)


def test_a_folder_is_refused_and_its_gram_csv_named(tmp_path: Path) -> None:
    np.savetxt(tmp_path / "gram.csv", np.eye(2), delimiter=",")
    with pytest.raises(ValueError, match="is a folder, not a Gram CSV file; pass .*gram.csv"):
        read_gram(str(tmp_path))
