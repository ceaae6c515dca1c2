"""Issue #18 point 5: every command prints the schedule, prediction type, weights and data it used, and records them
in its config JSON under the keys of gram_config.json (``gradconflict.cli._records``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gradconflict.cli import main
from gradconflict.data import load_dataset
from zoo import UNetLike

SPEC = """
import sys
sys.path.insert(0, %r)
import gradconflict as gc
from zoo import UNetLike

def build_x0():
    return UNetLike(), gc.NoiseSchedule.cosine(), "x0"

def build_v():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    return UNetLike(), scheduler, scheduler.config.prediction_type
""" % str(Path(__file__).parent)
DATA = ["--data", "synthetic", "--image-size", "8"]
N_SYNTHETIC = int(load_dataset("synthetic", image_size=8).images.shape[0])
DATA_LINE = f"data synthetic: {N_SYNTHETIC} images of 1x8x8"
COSINE_X0 = "schedule cosine (T = 1000), x0 prediction"
DIFFUSERS_V = "schedule from diffusers scheduler DDPMScheduler (T = 1000), v prediction"


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    """A file:function spec (the zoo's UNet) and a .safetensors holding raw and EMA (``ema.*``) weights of it."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("records")
    spec = root / "net.py"
    spec.write_text(SPEC)
    torch.manual_seed(0)
    raw = UNetLike().state_dict()
    save_file({**raw, **{f"ema.{k}": v * 0.5 for k, v in raw.items()}}, str(root / "ck.safetensors"))
    return {"root": root, "x0": f"{spec}:build_x0", "v": f"{spec}:build_v", "ck": root / "ck.safetensors"}


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _check(record: dict, schedule: str, prediction: str, weights: str, requested) -> None:
    assert (record["schedule"], record["T"], record["prediction"]) == (schedule, 1000, prediction)
    assert (record["weights"], record["weights_requested"], record["data"]) == (weights, requested, "synthetic")
    assert record["dataset"] == {"name": "synthetic", "path": "synthetic", "N": N_SYNTHETIC, "shape": [1, 8, 8]}


def test_gram_records_a_diffusers_v_prediction_and_raw_weights(setup, tmp_path: Path, capsys) -> None:
    pytest.importorskip("diffusers")
    out = tmp_path / "g"
    assert main(["gram", "--model", setup["v"], "--checkpoint", str(setup["ck"]), "--weights", "raw", *DATA,
                 "--bins", "2", "--per-task", "1", "--no-progress", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"gradconflict gram: {DIFFUSERS_V}; {DATA_LINE}" in err and "weights: the raw weights" in err
    _check(_json(out / "gram_config.json"), "from diffusers scheduler DDPMScheduler (T = 1000)", "v", "raw", "raw")


def test_bins_records_the_default_ema_weights(setup, tmp_path: Path, capsys) -> None:
    out = tmp_path / "b"
    assert main(["bins", "--model", setup["x0"], "--checkpoint", str(setup["ck"]), *DATA, "--fine", "4", "--bins",
                 "2", "--batches", "1", "--per-task", "1", "--out", str(out)]) == 0
    assert f"gradconflict bins: {COSINE_X0}; {DATA_LINE}" in capsys.readouterr().err
    _check(_json(out / "bins_config.json"), "cosine (T = 1000)", "x0", "ema", None)


def test_track_records_in_its_identity_without_comparing_the_names(setup, tmp_path: Path, capsys) -> None:
    pytest.importorskip("diffusers")
    out = tmp_path / "t"
    argv = ["track", "--model", setup["v"], "--checkpoints", str(setup["ck"]), "--weights", "raw", *DATA, "--bins",
            "2", "--per-task", "1", "--resamples", "1", "--strategies", "constant", "--ugd-steps", "2", "--out", str(out)]
    assert main(argv) == 0
    assert f"gradconflict track: {DIFFUSERS_V}; {DATA_LINE}" in capsys.readouterr().err
    config = _json(out / "track_config.json")
    assert (config["prediction"], config["T"], config["inputs"]["weights"]) == ("v", 1000, "raw")
    names = config["inputs"]["_names"]
    assert names["schedule"] == "from diffusers scheduler DDPMScheduler (T = 1000)" and names["data"] == "synthetic"
    assert names["dataset"]["N"] == N_SYNTHETIC
    del config["inputs"]["_names"]  # a folder recorded before: it resumes (the names are never compared)
    (out / "track_config.json").write_text(json.dumps(config))
    assert main(argv) == 0


def test_transfer_writes_its_record(setup, tmp_path: Path, capsys) -> None:
    out = tmp_path / "tr"
    assert main(["transfer", "--model", setup["x0"], "--checkpoint", str(setup["ck"]), "--weights", "raw", *DATA,
                 "--bins", "2", "--mode", "lookahead", "--batch-size", "2", "--eval-samples", "2", "--no-all",
                 "--quiet", "--out", str(out)]) == 0
    assert f"gradconflict transfer: {COSINE_X0}; {DATA_LINE}" in capsys.readouterr().err
    _check(_json(out / "transfer_config.json"), "cosine (T = 1000)", "x0", "raw", "raw")


def test_sample_records_beside_the_grid(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    assert main(["train", "--data", "synthetic", "--out", str(run), "--data-limit", "16", "--model", "dit-tiny",
                 "--steps", "1", "--batch-size", "4", "--image-size", "8", "--prediction", "v", "--schedule", "cosine",
                 "--quiet", "--model-overrides", '{"hidden_size": 16, "depth": 1, "num_heads": 2}']) == 0
    capsys.readouterr()
    assert main(["sample", "--run", str(run), "--out", str(tmp_path / "grid"), "--n", "1", "--steps", "1",
                 "--no-ema"]) == 0
    err = capsys.readouterr().err
    assert "gradconflict sample: schedule cosine (T = 1000), v prediction; no data" in err
    assert f"recorded in {tmp_path / 'grid_config.json'}" in err
    record = _json(tmp_path / "grid_config.json")
    assert (record["schedule"], record["prediction"], record["weights"], record["weights_requested"]) == \
        ("cosine (T = 1000)", "v", "raw", "raw")
    assert record["data"] is None and record["grid"] == str(tmp_path / "grid.png")


def test_solve_names_the_file_k_lam_method_and_the_gram_run_behind_it(tmp_path: Path, capsys) -> None:
    gram = tmp_path / "g.csv"
    gram.write_text("2,1\n1,3\n")
    assert main(["solve", str(gram), "--lam", "0.5", "--method", "frank_wolfe", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)  # a Gram CSV: no schedule, prediction, model weights or data
    assert (payload["gram"], payload["K"], payload["lam"], payload["method"]) == (str(gram), 2, 0.5, "frank_wolfe")
    assert payload["gram_source"] is None
    assert main(["solve", str(gram), "--lam", "0.5", "--method", "frank_wolfe"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"gram: {gram} (K = 2; no schedule, model or data recorded with it)"
    assert lines[1].startswith("method: frank_wolfe  lam: 0.5 ") and lines[1].endswith("K: 2")
    source = {"schedule": "linear (T = 1000)", "prediction": "eps", "weights": "ema", "data": "mnist"}
    (tmp_path / "gram_config.json").write_text(json.dumps({**source, "T": 1000}))  # as gram writes it beside
    assert main(["solve", str(gram)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == (
        f"gram: {gram} (K = 2; computed with schedule linear (T = 1000), eps prediction, ema weights, data mnist "
        "(its gram_config.json))")
    assert main(["solve", str(gram), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["gram_source"] == source


def test_compare_prints_what_compare_config_records(tmp_path: Path, capsys) -> None:
    out = tmp_path / "c"
    assert main(["compare", "--toy", "--seeds", "1", "--weightings", "constant", "--prediction", "v", "--weights",
                 "raw", "--no-progress", "--out", str(out)]) == 0
    assert ("gradconflict compare: schedule linear (T = 1000), v prediction; data synthetic; raw weights"
            in capsys.readouterr().err)
    config = _json(out / "compare_config.json")
    assert (config["schedule"], config["prediction"], config["weights"], config["data"]) == \
        ("linear", "v", "raw", "synthetic")


def test_reproduce_ends_with_its_models_and_where_it_wrote(monkeypatch, tmp_path: Path, capsys) -> None:
    import gradconflict.reproduce as pipeline

    seen = []
    monkeypatch.setattr(pipeline, "reproduce", lambda config, out, **kw: seen.append(config))
    assert main(["reproduce", "--toy", "--out", str(tmp_path)]) == 0
    train = seen[0].train
    captured = capsys.readouterr()
    assert (f"gradconflict reproduce: schedule {train.schedule} (T = {train.T}), {train.prediction} prediction; "
            f"data {train.data}; raw (track, transfer, Grams) and ema (samples.png, held-out check) weights") in captured.err
    assert f"the report: {tmp_path / 'figures' / 'REPORT.md'}" in captured.out
    assert f"wrote the figures to {tmp_path / 'figures'}" in captured.out
