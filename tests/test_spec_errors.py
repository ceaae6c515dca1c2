"""Issue #15: unreadable checkpoints and failing model spec files get one-line errors (exit 2), a run folder works
as --checkpoint, the EMA / raw weights choice is one flag with one default (EMA) that is printed and recorded,
a user's build() is seeded, and refusals name the data beside its hash."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from gradconflict.cli import main
from gradconflict.models import build_model, model_spec
from gradconflict.spec import load_model
from gradconflict.train import TrainConfig
from gradconflict.train.checkpoint import save_weights

SMALL = {"image_size": 8, "hidden_size": 32, "depth": 1}
GRAM = ["--data", "synthetic", "--bins", "2", "--per-task", "1"]
TRACK = [*GRAM, "--resamples", "1", "--ugd-steps", "5"]


def _weights(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return build_model("dit-tiny", **SMALL).state_dict()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    """A run folder as ``gradconflict train`` writes it (model.safetensors with raw and ``ema.*`` weights), with
    raw and EMA weights that differ (independent seeds), and both returned for reference."""
    folder = tmp_path_factory.mktemp("run")
    raw, ema = _weights(1), _weights(2)
    model = build_model("dit-tiny", **SMALL)
    model.load_state_dict(raw)
    config = TrainConfig(data="synthetic", model="dit-tiny", image_size=8, model_overrides={"hidden_size": 32, "depth": 1})
    save_weights(folder / "model.safetensors", model, ema, {"config": config.to_dict(), "model_spec": model_spec(model),
                                                            "step": 1})
    return folder, raw, ema


def _same(model: torch.nn.Module, reference: dict[str, torch.Tensor]) -> bool:
    state = model.state_dict()
    return all(torch.equal(state[k], v) for k, v in reference.items())


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "no error printed"
    return err[-1]


# --- unreadable .safetensors ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["random", "truncated"])
def test_corrupt_safetensors_checkpoint_is_one_line(run, tmp_path: Path, kind: str, capsys) -> None:
    good = (run[0] / "model.safetensors").read_bytes()
    bad = tmp_path / "w.safetensors"
    bad.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
                    .numpy().tobytes() if kind == "random" else good[: len(good) // 2])
    assert main(["gram", "--model", "dit-tiny", "--checkpoint", str(bad), *GRAM, "--out", str(tmp_path / "g")]) == 2
    line = _error(capsys)
    assert line.startswith("gradconflict gram: error: ") and "w.safetensors" in line and "safetensors file" in line


def test_corrupt_safetensors_in_run_folder_is_one_line(run, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "broken_run"
    folder.mkdir()
    good = (run[0] / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(good[: len(good) - 1000])
    assert main(["gram", "--model", str(folder), *GRAM, "--out", str(tmp_path / "g")]) == 2
    line = _error(capsys)
    assert line.startswith("gradconflict gram: error: ") and "model.safetensors" in line and "truncated" in line


# --- failing model spec files ---------------------------------------------------------------------------------

SPECS = {  # source, line of the error, what the message names
    "raises_at_import": ("import torch\nx = 1\nraise RuntimeError('bad config')\ndef build(): pass\n", 3, "RuntimeError: bad config"),
    "syntax_error": ("import torch\n\ndef build(:\n    pass\n", 3, "SyntaxError"),
    "missing_import": ("import torch\nimport no_such_module_gc15\ndef build(): pass\n", 2,
                       "ModuleNotFoundError: No module named 'no_such_module_gc15'"),
    "build_raises": ("import torch\n\ndef build():\n    y = 2\n    return foo + y\n", 5,
                     "NameError: name 'foo' is not defined"),
}


@pytest.mark.parametrize("case", sorted(SPECS))
def test_failing_spec_file_names_its_file_and_line(tmp_path: Path, case: str, capsys, monkeypatch) -> None:
    source, line, named = SPECS[case]
    (tmp_path / f"{case}.py").write_text(source)
    monkeypatch.chdir(tmp_path)
    assert main(["gram", "--model", f"{case}.py:build", *GRAM, "--out", "g"]) == 2
    err = _error(capsys)
    assert err.startswith(f"gradconflict gram: error: model spec {case}.py:build failed at {case}.py line {line}")
    assert named in err and "Traceback" not in capsys.readouterr().err


def test_spec_calling_sys_exit_is_reported(tmp_path: Path, capsys, monkeypatch) -> None:
    (tmp_path / "quits.py").write_text("import sys\ndef build():\n    sys.exit(3)\n")
    monkeypatch.chdir(tmp_path)
    assert main(["gram", "--model", "quits.py:build", *GRAM, "--out", "g"]) == 2
    assert "quits.py:build called sys.exit(3) while loading" in _error(capsys)


# --- a run folder as --checkpoint -----------------------------------------------------------------------------

def test_run_folder_as_checkpoint_uses_its_weights_file(run, tmp_path: Path, capsys) -> None:
    folder, _, ema = run
    assert main(["gram", "--model", "dit-tiny", "--checkpoint", str(folder), *GRAM, "--out", str(tmp_path / "g")]) == 0
    assert "training run folder: using its model.safetensors" in capsys.readouterr().err
    assert _same(load_model("dit-tiny", folder, verbose=False).model, ema)


def test_other_folder_as_checkpoint_says_what_to_pass(tmp_path: Path, capsys) -> None:
    (tmp_path / "weights").mkdir()
    assert main(["gram", "--model", "dit-tiny", "--checkpoint", str(tmp_path / "weights"), *GRAM,
                 "--out", str(tmp_path / "g")]) == 2
    assert "is a folder, not a weights file" in _error(capsys)


# --- one weights rule -----------------------------------------------------------------------------------------

def test_ema_is_the_default_for_a_run_folder_and_its_files(run) -> None:
    folder, raw, ema = run
    assert _same(load_model(str(folder), verbose=False).model, ema)
    assert _same(load_model("dit-tiny", folder / "model.safetensors", verbose=False).model, ema)  # was raw
    assert _same(load_model("dit-tiny", folder / "model.safetensors", verbose=False, weights="raw").model, raw)
    assert _same(load_model(str(folder), verbose=False, weights="raw").model, raw)


def test_a_file_without_ema_is_used_as_saved_and_ema_is_refused(run, tmp_path: Path) -> None:
    torch.manual_seed(3)
    plain = build_model("dit-tiny").state_dict()  # a plain state dict: one set of weights
    torch.save(plain, tmp_path / "plain.pt")
    loaded = load_model("dit-tiny", tmp_path / "plain.pt", verbose=False)
    assert loaded.weights == "as saved" and _same(loaded.model, plain)
    with pytest.raises(ValueError, match="holds no EMA weights"):
        load_model("dit-tiny", tmp_path / "plain.pt", verbose=False, weights="ema")


def test_gram_prints_and_records_the_weights(run, tmp_path: Path, capsys) -> None:
    folder = run[0]
    assert main(["gram", "--model", str(folder), *GRAM, "--out", str(tmp_path / "g")]) == 0
    assert "weights: the EMA weights" in capsys.readouterr().err
    assert json.loads((tmp_path / "g" / "gram_config.json").read_text())["weights"] == "ema"
    assert main(["gram", "--model", str(folder), "--weights", "raw", *GRAM, "--out", str(tmp_path / "g")]) == 0
    assert "weights: the raw weights" in capsys.readouterr().err
    assert json.loads((tmp_path / "g" / "gram_config.json").read_text())["weights"] == "raw"


def test_track_records_weights_and_refuses_another_choice(run, tmp_path: Path, capsys) -> None:
    ck = str(run[0] / "model.safetensors")
    out = tmp_path / "t"
    assert main(["track", "--model", "dit-tiny", "--checkpoints", ck, *TRACK, "--out", str(out)]) == 0
    assert json.loads((out / "track_config.json").read_text())["inputs"]["weights"] == "ema"
    capsys.readouterr()
    assert main(["track", "--model", "dit-tiny", "--checkpoints", ck, *TRACK, "--weights", "raw", "--out", str(out)]) == 2
    assert "inputs.weights" in _error(capsys)


def test_track_folder_recorded_before_the_flag_resumes_with_raw(run, tmp_path: Path, capsys) -> None:
    """Before --weights, track loaded the raw weights of training files; such a folder (no weights key) resumes
    with them and records them, and --weights ema is refused there."""
    ck = str(run[0] / "model.safetensors")
    out = tmp_path / "t"
    assert main(["track", "--model", "dit-tiny", "--checkpoints", ck, *TRACK, "--weights", "raw", "--out", str(out)]) == 0
    stamp = out / "track_config.json"
    old = json.loads(stamp.read_text())
    for key in ("weights", "_names"):
        old["inputs"].pop(key)
    stamp.write_text(json.dumps(old))
    grams = (out / "track_grams.npz").read_bytes()
    assert main(["track", "--model", "dit-tiny", "--checkpoints", ck, *TRACK, "--out", str(out)]) == 0
    assert json.loads(stamp.read_text())["inputs"]["weights"] == "raw"
    assert (out / "track_grams.npz").read_bytes() == grams  # the step was skipped, nothing recomputed
    capsys.readouterr()
    assert main(["track", "--model", "dit-tiny", "--checkpoints", ck, *TRACK, "--weights", "ema", "--out", str(out)]) == 2
    assert "inputs.weights" in _error(capsys)


def test_refusal_names_the_data_beside_its_hash(run, tmp_path: Path, capsys) -> None:
    ck = str(run[0] / "model.safetensors")
    out = tmp_path / "t"
    images = torch.rand(8, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1  # 8 grayscale 8 x 8 images
    np.save(tmp_path / "first.npy", images.numpy())
    np.save(tmp_path / "second.npy", images.numpy()[::-1].copy())
    base = ["track", "--model", "dit-tiny", "--checkpoints", ck, "--bins", "2", "--per-task", "1", "--resamples",
            "1", "--ugd-steps", "5", "--out", str(out)]
    assert main([*base, "--data", str(tmp_path / "first.npy")]) == 0
    capsys.readouterr()
    assert main([*base, "--data", str(tmp_path / "second.npy")]) == 2
    line = _error(capsys)
    assert re.search(r"inputs\.data: \"\w+\" \(.*first\.npy\) recorded, \"\w+\" \(.*second\.npy\) now", line), line


# --- a user's build() is seeded -------------------------------------------------------------------------------

def test_user_build_is_seeded_from_seed(tmp_path: Path, capsys, monkeypatch) -> None:
    (tmp_path / "mine.py").write_text(textwrap.dedent("""
        from gradconflict.models import build_model

        def build():
            return build_model("dit-tiny", image_size=8, hidden_size=32, depth=1)
    """))
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(5)
    reference = build_model("dit-tiny", **SMALL).state_dict()  # what torch seeded with 5 builds
    assert _same(load_model("mine.py:build", verbose=False, seed=5).model, reference)
    torch.rand(3)  # the global generator moves on; the build does not depend on it
    assert _same(load_model("mine.py:build", verbose=False, seed=5).model, reference)
    grams = []
    for _ in range(2):
        torch.rand(7)
        assert main(["gram", "--model", "mine.py:build", *GRAM, "--seed", "5", "--out", "g"]) == 0
        grams.append((tmp_path / "g" / "gram.csv").read_text())
    assert grams[0] == grams[1]
    assert "seeded from --seed 5" in capsys.readouterr().err


def test_transfer_records_weights_and_an_old_folder_resumes(run, tmp_path: Path, capsys) -> None:
    """transfer --model RUN used the EMA weights before --weights existed: such a folder resumes with them."""
    out = tmp_path / "x"
    argv = ["transfer", "--model", str(run[0]), "--data", "synthetic", "--bins", "2", "--steps", "1", "--batch-size",
            "2", "--eval-samples", "2", "--quiet", "--no-all", "--out", str(out)]
    assert main(argv) == 0
    assert "weights: the EMA weights" in capsys.readouterr().err
    stamp = out / "transfer_resume.json"
    recorded = json.loads(stamp.read_text())
    assert recorded["weights"] == "ema" and "synthetic" in recorded["_names"]["data"]
    stamp.write_text(json.dumps({k: v for k, v in recorded.items() if k not in ("weights", "_names")}))
    assert main(argv) == 0
    assert json.loads(stamp.read_text())["weights"] == "ema"
    assert main([*argv, "--weights", "raw"]) == 2
    assert "weights" in _error(capsys)


def test_sample_prints_its_weights_and_refuses_a_contradiction(run, tmp_path: Path, capsys) -> None:
    argv = ["sample", "--run", str(run[0]), "--n", "1", "--steps", "1", "--out", str(tmp_path / "s.png")]
    assert main([*argv, "--weights", "raw"]) == 0
    assert "weights: the raw weights" in capsys.readouterr().err
    assert main([*argv, "--no-ema", "--weights", "ema"]) == 2
    assert "contradict" in _error(capsys)


def test_readme_weighting_example_is_seeded() -> None:
    """The README's snippet that builds dit-tiny gives the same Gram in every run (it seeds torch first)."""
    pytest.importorskip("sklearn")  # the example's data: sklearn's 8x8 digits
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### Scoring your own weighting scheme against the Pareto optimum", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1).split("\nmine = ", 1)[0]
    assert "res = gc.task_gram" in code
    grams = []
    for draw in range(2):
        torch.rand(draw + 1)  # whatever the generator's state before the snippet
        scope: dict = {}
        exec(code, scope)  # noqa: S102 - the README's own example
        grams.append(scope["res"].gram)
    assert torch.equal(grams[0], grams[1])
