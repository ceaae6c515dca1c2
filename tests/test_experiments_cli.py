"""The experiment scripts' command line (README flags, Fig. 2 like the other figures) and `gradconflict sample`'s
checks (eta, steps, the printed path, atomic write)."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from gradconflict.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"
# the figure scripts: each regenerates a figure of the reproduction through the shared options of _common.py
# (experiments/bins_across_models.py, an analysis of `gradconflict bins` folders, has options of its own)
SCRIPTS = sorted(p for p in EXPERIMENTS.glob("*.py") if not p.name.startswith("_") and "_common import" in p.read_text())
TINY = ["--data-limit", "32", "--model", "dit-tiny", "--steps", "2", "--batch-size", "4", "--image-size", "8",
        "--quiet", "--model-overrides", '{"hidden_size": 16, "depth": 1, "num_heads": 2}']


@pytest.fixture(scope="module")
def fig2() -> ModuleType:
    """experiments/fig2_transfer.py imported as a module (it imports its sibling _common)."""
    sys.path.insert(0, str(EXPERIMENTS))
    try:
        yield importlib.import_module("fig2_transfer")
    finally:
        sys.path.remove(str(EXPERIMENTS))


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    """A two-step training run on "digits" (not the mnist default) with a tiny DiT."""
    run = tmp_path_factory.mktemp("digits") / "run"
    assert cli_main(["train", "--data", "digits", "--out", str(run), *TINY]) == 0
    return run


# ---------------------------------------------------------------------------------------------- finding A: README


def test_readme_experiment_flags_are_accepted_by_every_script() -> None:
    readme = (ROOT / "README.md").read_text()
    lines = [line for line in readme.splitlines() if "experiments/" in line or "--preset" in line]
    flags = set(re.findall(r"(--[a-z][a-z-]*)", " ".join(lines)))
    assert {"--preset", "--device", "--full"} <= flags, "the README should document the scripts' preset flags"
    assert SCRIPTS and len(SCRIPTS) >= 5
    for script in SCRIPTS:
        out = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, (script.name, out.stderr)
        for flag in flags - {"--checkpoint", "--data"}:
            assert flag in out.stdout, f"README documents {flag} but {script.name} does not accept it"
    fig2_help = subprocess.run([sys.executable, str(EXPERIMENTS / "fig2_transfer.py"), "--help"], capture_output=True,
                               text=True, timeout=120).stdout
    assert "--checkpoint" in fig2_help and "--data" in fig2_help


def test_full_is_an_alias_of_preset_full(fig2: ModuleType) -> None:
    parse = fig2.build_parser().parse_args
    assert parse(["--full", "--device", "cuda"]).preset == "full"
    assert parse(["--preset", "full"]).preset == "full"
    assert parse([]).preset == "quick"
    assert parse(["--toy"]).preset == "toy"


def test_conflicting_presets_are_refused(fig2: ModuleType, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        fig2.build_parser().parse_args(["--full", "--preset", "toy"])
    assert info.value.code == 2 and "not allowed" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- finding B: Fig. 2


def test_fig2_writes_under_out_and_shares_the_reproduce_cache(tmp_path: Path, capsys) -> None:
    out, cwd = tmp_path / "out", tmp_path / "cwd"
    cwd.mkdir()
    done = subprocess.run([sys.executable, str(EXPERIMENTS / "fig2_transfer.py"), "--toy", "--out", str(out),
                           "--no-progress"], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (out / "figures" / "fig2_transfer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "figures" / "fig2_transfer.csv").stat().st_size > 0
    assert (out / "runs" / "reproduce-toy").is_dir()
    assert not list(cwd.iterdir()), "nothing may be written outside --out (the old script wrote runs/ here)"
    assert re.search(r"^C1 (holds|does not hold)", done.stdout, flags=re.M)
    # the same stages as `gradconflict reproduce --toy`: nothing is trained or fine-tuned again
    assert cli_main(["reproduce", "--toy", "--out", str(out), "--no-progress", "--only", "fig2_transfer"]) == 0
    log = capsys.readouterr().out
    assert "[seed0/track] cached" in log and "[seed0/transfer-adamw] cached" in log


def test_fig2_checkpoint_uses_the_data_of_its_training_run(fig2: ModuleType, digits_run: Path, tmp_path: Path,
                                                          capsys) -> None:
    assert fig2.training_config(digits_run).data == "digits"
    assert fig2.training_config(digits_run / "model.safetensors").data == "digits"
    assert fig2.training_config(digits_run / "checkpoint.pt").data == "digits"
    assert fig2.training_config("dit-tiny") is None
    assert fig2.main(["--checkpoint", str(digits_run), "--toy", "--out", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "data: digits (the run was trained on it)" in out and "on digits" in out
    assert "mnist" not in out
    assert (tmp_path / "figures" / "fig2_transfer.png").is_file() and (tmp_path / "figures" / "fig2_transfer.csv").is_file()


def test_fig2_data_option_overrides_the_training_data(fig2: ModuleType, digits_run: Path, tmp_path: Path, capsys) -> None:
    assert fig2.main(["--checkpoint", str(digits_run), "--data", "synthetic", "--toy", "--out", str(tmp_path),
                      "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "on synthetic" in out and "data: digits" not in out


@pytest.mark.parametrize("argv, message", [
    (["--out", "figures/fig2_transfer.png"], "--out is the output folder"),
    (["--data", "digits"], "--data applies to --checkpoint only"),
    (["--checkpoint", "no/such/run"], "unknown model"),
])
def test_fig2_user_errors_exit_2_with_a_message(fig2: ModuleType, capsys, argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as info:
        fig2.main([*argv, "--toy", "--no-progress"])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- finding C: sample


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("sample") / "run"
    assert cli_main(["train", "--data", "synthetic", "--out", str(run), *TINY]) == 0
    return run


def test_sample_prints_the_path_it_wrote(tiny_run: Path, tmp_path: Path, capsys) -> None:
    target = tmp_path / "S" / "noext"
    assert cli_main(["sample", "--run", str(tiny_run), "--out", str(target), "--n", "2", "--steps", "2"]) == 0
    written = target.with_name("noext.png")
    assert written.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not target.exists()
    assert capsys.readouterr().out.strip() == f"wrote {written}"
    assert sorted(p.name for p in written.parent.iterdir()) == ["noext.png", "noext_config.json"], \
        "no temporary file may be left"


@pytest.mark.parametrize("extra, message", [
    (["--eta", "5"], "--eta must be in [0, 1]"),
    (["--eta", "-0.1"], "--eta must be in [0, 1]"),
    (["--eta", "nan"], "--eta must be in [0, 1]"),
    (["--sampler", "ddpm", "--eta", "0.5"], "ddim only"),
    (["--steps", "5000"], "exceeds the run's T = 1000"),
    (["--steps", "0"], "--steps must be >= 1"),
])
def test_sample_rejects_impossible_options(tiny_run: Path, tmp_path: Path, capsys, extra: list[str], message: str) -> None:
    out = tmp_path / "grid.png"
    assert cli_main(["sample", "--run", str(tiny_run), "--out", str(out), "--n", "2", *extra]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_sample_accepts_the_bounds(tiny_run: Path, tmp_path: Path) -> None:
    assert cli_main(["sample", "--run", str(tiny_run), "--out", str(tmp_path / "a.png"), "--n", "1", "--steps", "2",
                     "--eta", "1"]) == 0
    assert (tmp_path / "a.png").stat().st_size > 0


def test_sample_never_leaves_a_partial_png(tiny_run: Path, tmp_path: Path, monkeypatch) -> None:
    """A write interrupted half-way leaves the previous grid in place and no temporary file."""
    from matplotlib.figure import Figure

    def broken(self, path, **kwargs):
        Path(path).write_bytes(b"\x89PNG partial")
        raise KeyboardInterrupt

    out = tmp_path / "grid.png"
    out.write_bytes(b"previous grid")
    monkeypatch.setattr(Figure, "savefig", broken)
    # the command line reports the interrupt in one line (exit 130) instead of a traceback
    assert cli_main(["sample", "--run", str(tiny_run), "--out", str(out), "--n", "1", "--steps", "2"]) == 130
    assert out.read_bytes() == b"previous grid"
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]
