"""experiments/bins_across_models.py: the across-model spread of clustered boundaries, against hand-computed values."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pandas as pd
import pytest

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


@pytest.fixture(scope="module")
def script():
    sys.path.insert(0, str(EXPERIMENTS))
    try:
        yield importlib.import_module("bins_across_models")
    finally:
        sys.path.remove(str(EXPERIMENTS))


def _bins(folder: Path, edges: list[int], model: str) -> Path:
    folder.mkdir(parents=True)
    rows = [{"bin": k, "t_low": lo, "t_high": hi - 1} for k, (lo, hi) in enumerate(zip(edges[:-1], edges[1:]))]
    pd.DataFrame(rows).to_csv(folder / "bins.csv", index=False)
    (folder / "bins_config.json").write_text(json.dumps({"model": model, "fine": 100 if model != "coarse" else 50}))
    return folder


def test_boundary_spread_over_models(script, tmp_path: Path) -> None:
    a = _bins(tmp_path / "a", [0, 30, 110, 1000], "m0")
    b = _bins(tmp_path / "b", [0, 40, 110, 1000], "m1")
    c = _bins(tmp_path / "c", [0, 20, 200, 1000], "m2")
    assert script.main([str(a), str(b), str(c), "--out", str(tmp_path / "e.csv")]) == 0
    frame = pd.read_csv(tmp_path / "e.csv")
    assert len(frame) == 6 and list(frame[frame["model"] == str(b)]["t_boundary"]) == [40, 110]
    first = frame[frame["boundary"] == 1].iloc[0]
    assert first["mean"] == pytest.approx(30.0) and first["sd"] == pytest.approx(10.0)  # 20, 30, 40
    second = frame[frame["boundary"] == 2].iloc[0]
    assert (second["min"], second["max"]) == (110, 200) and second["sd"] == pytest.approx(51.961524, rel=1e-6)


def test_different_k_is_refused(script, tmp_path: Path) -> None:
    a = _bins(tmp_path / "a", [0, 30, 1000], "m0")
    b = _bins(tmp_path / "b", [0, 40, 110, 1000], "m1")
    with pytest.raises(ValueError, match="differ in K, T or --fine"):
        script.edges_by_model([a, b])
    c = _bins(tmp_path / "c", [0, 40, 1000], "coarse")  # same K, another --fine
    with pytest.raises(ValueError, match="differ in K, T or --fine"):
        script.edges_by_model([a, c])


def test_a_missing_folder_is_one_line(script, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        script.main([str(tmp_path / "nope"), "--out", str(tmp_path / "e.csv")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "error: bins file" in err and "Traceback" not in err
