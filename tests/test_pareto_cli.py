"""Tests for the ``gradconflict solve`` subcommand (gradconflict.cli.solve)."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gradconflict.cli.solve import add_parser, main, read_gram

ROOT = Path(__file__).resolve().parents[1]
LABELS = ["t000-250", "t250-500", "t500-750", "t750-1000"]
G = np.array([[4.0, 1.0, 0.0, 0.5], [1.0, 3.0, 0.2, 0.0], [0.0, 0.2, 2.0, 0.1], [0.5, 0.0, 0.1, 5.0]])


def expected_weights(lam: float) -> np.ndarray:
    """Independent reference: all weights are positive here, so w = Q^-1 1 / 1^T Q^-1 1."""
    x = np.linalg.solve(G + lam * np.eye(4), np.ones(4))
    assert (x > 0).all()
    return x / x.sum()


@pytest.fixture
def labeled(tmp_path):
    path = tmp_path / "gram.csv"
    pd.DataFrame(G, index=LABELS, columns=LABELS).to_csv(path)
    return path


def test_labeled_csv_prints_weights(labeled, capsys):
    assert main([str(labeled), "--lam", "0.1"]) == 0
    out = capsys.readouterr().out
    w = expected_weights(0.1)
    for label, weight in zip(LABELS, w):
        assert re.search(rf"^{label}\s+{weight:.8f}$", out, flags=re.M)
    f = w @ G @ w + 0.1 * w @ w
    assert f"objective: {f:.10g}" in out and "gap: " in out and "method: auto" in out


def test_headerless_csv_and_json(tmp_path, capsys):
    path = tmp_path / "plain.csv"
    np.savetxt(path, G, delimiter=",")
    assert main([str(path), "--method", "cvxpy", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert list(payload["weights"]) == ["0", "1", "2", "3"]
    np.testing.assert_allclose(list(payload["weights"].values()), expected_weights(0.0), atol=1e-6)
    assert payload["method"] == "cvxpy" and payload["gap"] >= 0


def test_numeric_labels_are_not_data(tmp_path):
    path = tmp_path / "numlab.csv"
    pd.DataFrame(G).to_csv(path)  # header 0..3 and index 0..3, empty corner cell
    np.testing.assert_array_equal(read_gram(str(path)).to_numpy(), G)


@pytest.mark.parametrize("method, extra", [("frank_wolfe", ["--variant", "vanilla", "--max-iter", "50000", "--tol", "1e-6"]), ("ugd", ["--max-iter", "3000"])])
def test_other_methods(labeled, capsys, method, extra):
    assert main([str(labeled), "--lam", "0.1", "--method", method, "--json", *extra]) == 0
    payload = json.loads(capsys.readouterr().out)
    np.testing.assert_allclose(list(payload["weights"].values()), expected_weights(0.1), atol=1e-2)


def test_errors_exit_2(tmp_path, labeled, capsys):
    assert main([str(labeled), "--lam", "-1"]) == 2
    assert "lam must be >= 0" in capsys.readouterr().err
    bad = tmp_path / "bad.csv"
    pd.DataFrame(np.ones((2, 3))).to_csv(bad, index=False, header=False)
    assert main([str(bad)]) == 2
    assert "square" in capsys.readouterr().err
    assert main([str(tmp_path / "missing.csv")]) == 2


def test_add_parser_registers_subcommand(labeled, capsys):
    parser = argparse.ArgumentParser(prog="gradconflict")
    sub = parser.add_subparsers(dest="command")
    add_parser(sub)
    args = parser.parse_args(["solve", str(labeled), "--lam", "0.5"])
    assert args.command == "solve" and args.lam == 0.5 and args.method == "auto"
    assert args.handler(args) == 0
    assert LABELS[0] in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["solve", "--help"])
    assert exc.value.code == 0
    assert "GRAM.csv" in capsys.readouterr().out


def test_module_help_subprocess():
    out = subprocess.run(
        [sys.executable, "-m", "gradconflict.cli.solve", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and "--lam" in out.stdout and "--method" in out.stdout


def test_repeated_labels_keep_every_weight_in_json(tmp_path, capsys):
    import json

    from gradconflict.cli import main

    path = tmp_path / "g.csv"
    path.write_text("a,a\n2,-1\n-1,3\n")
    assert main(["solve", str(path), "--json"]) == 0
    weights = json.loads(capsys.readouterr().out)["weights"]
    assert weights == pytest.approx({"a": 4 / 7, "a.1": 3 / 7})


def test_lam_rel_is_a_multiple_of_the_mean_diagonal(tmp_path, capsys):
    """--lam-rel X solves with lam = X trace(G)/K (track's unit): the two-task closed form at lam = 0.15."""
    path = tmp_path / "g.csv"
    np.savetxt(path, np.array([[2.0, 0.5], [0.5, 1.0]]), delimiter=",")
    assert main([str(path), "--lam-rel", "0.1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["lam"] == pytest.approx(0.15) and out["lam_rel"] == pytest.approx(0.1)
    w1 = (1.15 - 0.5) / (2.15 + 1.15 - 1.0)  # (Q22 - Q12) / (Q11 + Q22 - 2 Q12), Q = G + lam I
    assert list(out["weights"].values()) == pytest.approx([w1, 1 - w1], abs=1e-12)
    assert main([str(path), "--lam-rel", "0.1", "--lam", "1"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main([str(path), "--lam-rel", "-1"]) == 2



def test_lam_rel_needs_a_gram_and_json_stays_valid(tmp_path, capsys):
    path = tmp_path / "neg.csv"
    np.savetxt(path, -np.eye(2), delimiter=",")
    assert main([str(path), "--lam-rel", "0.1"]) == 2
    assert "needs trace(G) >= 0" in capsys.readouterr().err
    np.savetxt(path, np.zeros((2, 2)), delimiter=",")
    assert main([str(path), "--lam", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["lam_rel"] is None  # not Infinity (invalid JSON)
