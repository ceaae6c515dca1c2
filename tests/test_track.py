"""Over-training tracking: strategy scores equal the objective of their normalized bin weights; resume; refusal."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import gradconflict as gc
from gradconflict.track import TrackConfig, lambda_sweep, track_models

from zoo import UNetLike

SCHEDULE = gc.NoiseSchedule.linear(T=1000)


def _models():
    torch.manual_seed(0)
    return [(0, UNetLike()), (5, UNetLike())]


def _cfg(**kw) -> TrackConfig:
    base = dict(bins=4, per_task=2, resamples=2, ugd_steps=300, fw_max_iter=500, lam=0.1)
    base.update(kw)
    return TrackConfig(**base)


def test_strategy_scores_equal_objective_of_their_bin_weights(tmp_path: Path) -> None:
    images = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    res = track_models(_models(), images, SCHEDULE, "eps", _cfg(), out_dir=tmp_path, progress=False)
    snr = np.array([SCHEDULE.alphas_cumprod[t] / (1 - SCHEDULE.alphas_cumprod[t]) for t in range(1000)])
    hand = {"constant": np.ones(1000), "snr": snr, "max_snr_1": np.maximum(snr, 1.0), "min_snr_5": np.minimum(snr, 5.0)}
    objectives = res.objectives
    for (step, r), G in res.grams.items():
        lam_abs = 0.1 * np.trace(G) / 4
        rows = objectives[(objectives["step"] == step) & (objectives["resample"] == r)].set_index("name")
        for name, x0_weight in hand.items():
            w = np.array([x0_weight[k * 250:(k + 1) * 250].sum() for k in range(4)])
            w = w / w.sum()
            expected = float(w @ G @ w + lam_abs * w @ w)
            assert rows.loc[name, "objective"] == pytest.approx(expected, rel=1e-12)
            assert rows.loc[name, "ratio"] >= 1 - 1e-9
        # every exact solver agrees with the optimum; UGD is never below it
        assert rows.loc["cvxpy", "ratio"] == pytest.approx(1.0, abs=1e-6)
        assert rows.loc["ugd", "ratio"] >= 1 - 1e-9
    weights = res.weights.groupby(["step", "resample", "name"])["weight"].sum()
    np.testing.assert_allclose(weights.to_numpy(), 1.0, atol=1e-6)


def test_resume_skips_done_steps_and_refuses_other_config(tmp_path: Path) -> None:
    images = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    first = track_models(_models()[:1], images, SCHEDULE, "eps", _cfg(resamples=1), out_dir=tmp_path, progress=False)
    calls = []

    def loader():
        calls.append(1)
        return UNetLike()

    both = track_models([(0, loader), (5, loader)], images, SCHEDULE, "eps", _cfg(resamples=1), out_dir=tmp_path,
                        progress=False)
    assert len(calls) == 1  # step 0 was already done and was not recomputed (nor loaded)
    assert sorted(both.objectives["step"].unique()) == [0, 5]
    np.testing.assert_array_equal(both.grams[(0, 0)], first.grams[(0, 0)])
    with pytest.raises(ValueError, match="another config"):
        track_models(_models(), images, SCHEDULE, "eps", _cfg(resamples=1, lam=1.0), out_dir=tmp_path, progress=False)


def test_lambda_sweep_goes_from_sparse_to_uniform() -> None:
    rng = np.random.default_rng(0)
    A = rng.normal(size=(6, 3)) * np.array([1.0, 0.1, 0.01])
    G = A @ A.T
    df = lambda_sweep(G, gc.TimestepBins.uniform(60, 6), lams=[0.0, 1e4])
    w_big = df[df["lam"] == 1e4].weight.to_numpy()
    np.testing.assert_allclose(w_big, 1 / 6, atol=1e-3)  # huge lam: uniform
    assert df[df["lam"] == 0.0].entropy.iloc[0] < df[df["lam"] == 1e4].entropy.iloc[0]
    with pytest.raises(ValueError, match="lam"):
        lambda_sweep(G, gc.TimestepBins.uniform(60, 6), lams=[-1.0])


def _user_model_and_checkpoints(tmp_path: Path) -> tuple[Path, list[str]]:
    """A ``file.py:build`` model spec (the zoo's UNet) and two checkpoints of it with different weights."""
    spec = tmp_path / "net.py"
    spec.write_text("import sys\nsys.path.insert(0, %r)\nimport gradconflict as gc\nfrom zoo import UNetLike\n\n"
                    "def build():\n    return UNetLike(), gc.NoiseSchedule.linear(), 'eps'\n" % str(Path(__file__).parent))
    paths = []
    for k in range(2):
        torch.manual_seed(k)
        path = tmp_path / f"ckpt{k}.pt"
        torch.save(UNetLike().state_dict(), path)
        paths.append(str(path))
    return spec, paths


def test_track_cli_on_user_checkpoints(tmp_path: Path, capsys) -> None:
    from gradconflict.cli import main

    spec, paths = _user_model_and_checkpoints(tmp_path)
    out = tmp_path / "out"
    code = main(["track", "--model", f"{spec}:build", "--checkpoints", *paths, "--steps", "100", "200",
                 "--data", "synthetic", "--image-size", "8", "--bins", "4", "--per-task", "2", "--resamples", "2",
                 "--out", str(out)])
    assert code == 0
    obj = pd.read_csv(out / "track_objectives.csv")
    assert sorted(obj["step"].unique()) == [100, 200]
    assert (out / "fig4_pareto_objective.png").stat().st_size > 0
    assert "mean ratio to the Pareto optimum" in capsys.readouterr().out


def test_a_step_tracked_from_another_source_or_other_inputs_is_refused(tmp_path: Path) -> None:
    """Rerunning into a folder skips the steps it holds, so those steps must stand for the same models and data."""
    images = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    kw = dict(out_dir=tmp_path, progress=False, inputs={"model": "unet", "data": "a"})
    track_models(_models()[:1], images, SCHEDULE, "eps", _cfg(resamples=1), sources={0: "ckpt-a", 5: "ckpt-b"}, **kw)
    with pytest.raises(ValueError, match="step 0 tracked from 'ckpt-a', not 'ckpt-b'"):
        track_models(_models()[:1], images, SCHEDULE, "eps", _cfg(resamples=1), sources={0: "ckpt-b"}, **kw)
    # a step not tracked yet may come from anywhere (e.g. its checkpoint was re-saved after an interrupted run)
    more = track_models(_models(), images, SCHEDULE, "eps", _cfg(resamples=1), sources={0: "ckpt-a", 5: "ckpt-c"}, **kw)
    assert sorted(more.objectives["step"].unique()) == [0, 5]  # a new step from a new source is added
    with pytest.raises(ValueError, match="step 5 tracked from 'ckpt-c', not 'ckpt-d'"):
        track_models(_models(), images, SCHEDULE, "eps", _cfg(resamples=1), sources={0: "ckpt-a", 5: "ckpt-d"}, **kw)
    with pytest.raises(ValueError, match=r"differs in \['inputs.data'\]"):
        track_models(_models(), images, SCHEDULE, "eps", _cfg(resamples=1), out_dir=tmp_path, progress=False,
                     inputs={"model": "unet", "data": "b"})
    with pytest.raises(ValueError, match=r"step\(s\) \[0\] given more than once"):
        track_models([(0, UNetLike()), (0, UNetLike())], images, SCHEDULE, "eps", _cfg(resamples=1))


def test_track_cli_refuses_other_checkpoints_or_data_in_the_same_out(tmp_path: Path) -> None:
    from gradconflict.cli import main

    spec, paths = _user_model_and_checkpoints(tmp_path)
    common = ["track", "--model", f"{spec}:build", "--image-size", "8", "--bins", "4", "--per-task", "2",
              "--resamples", "1", "--out", str(tmp_path / "out")]
    assert main([*common, "--checkpoints", paths[0], "--steps", "100", "--data", "synthetic"]) == 0
    assert main([*common, "--checkpoints", paths[1], "--steps", "100", "--data", "synthetic"]) == 2  # other model
    assert main([*common, "--checkpoints", paths[0], "--steps", "100", "--data", "digits"]) == 2  # other data
    assert main([*common, "--checkpoints", paths[0], paths[1], "--steps", "100", "200", "--data", "synthetic"]) == 0
    obj = pd.read_csv(tmp_path / "out" / "track_objectives.csv")
    assert sorted(obj["step"].unique()) == [100, 200]


def test_track_cli_records_data_by_content_and_refuses_a_checkpoint_under_another_step(tmp_path: Path,
                                                                                       monkeypatch) -> None:
    """A data file rewritten in place is other data (it was recorded by its name), the same file given by another
    path is the same data and model, and a rerun that forgot --steps would make one checkpoint stand for two steps."""
    from gradconflict.cli import main

    spec, paths = _user_model_and_checkpoints(tmp_path)
    data = tmp_path / "data.npy"
    np.save(data, np.random.default_rng(0).uniform(-1, 1, (16, 1, 8, 8)).astype(np.float32))
    monkeypatch.chdir(tmp_path)
    common = ["--image-size", "8", "--bins", "4", "--per-task", "2", "--resamples", "1", "--out", str(tmp_path / "out")]
    assert main(["track", "--model", "net.py:build", "--checkpoints", paths[0], "--steps", "100", "--data",
                 "data.npy", *common]) == 0
    # the same model file and data by absolute paths: the same experiment, a new step is added
    assert main(["track", "--model", f"{spec}:build", "--checkpoints", paths[0], paths[1], "--steps", "100", "200",
                 "--data", str(data), *common]) == 0
    # the checkpoints again without --steps: they would become steps 0 and 1
    assert main(["track", "--model", f"{spec}:build", "--checkpoints", paths[0], paths[1], "--data", str(data),
                 *common]) == 2
    np.save(data, np.full((16, 1, 8, 8), 0.9, dtype=np.float32))  # rewritten in place: other data
    assert main(["track", "--model", f"{spec}:build", "--checkpoints", paths[0], paths[1], "--steps", "100", "200",
                 "--data", str(data), *common]) == 2
    obj = pd.read_csv(tmp_path / "out" / "track_objectives.csv")
    assert sorted(obj["step"].unique()) == [100, 200]


def test_track_cli_resumes_a_folder_recorded_by_name_and_a_checkpoint_given_at_two_steps(tmp_path: Path) -> None:
    """Folders of older versions recorded the data by its path: with the same arguments they resume (the record
    is upgraded to the content); one checkpoint deliberately given for two steps resumes too."""
    import json

    from gradconflict.cli import main

    spec, paths = _user_model_and_checkpoints(tmp_path)
    out = tmp_path / "out"
    common = ["--model", f"{spec}:build", "--image-size", "8", "--bins", "4", "--per-task", "2", "--resamples", "1",
              "--data", "synthetic", "--out", str(out)]
    assert main(["track", "--checkpoints", paths[0], paths[0], "--steps", "100", "200", *common]) == 0
    cfg = json.loads((out / "track_config.json").read_text())
    cfg["inputs"] = {"model": f"{spec}:build", "data": "synthetic", "image_size": 8}  # as an older version wrote it
    (out / "track_config.json").write_text(json.dumps(cfg))
    assert main(["track", "--checkpoints", paths[0], paths[0], paths[1], "--steps", "100", "200", "300",
                 *common]) == 0
    assert json.loads((out / "track_config.json").read_text())["inputs"]["data"] != "synthetic"  # now by content
    assert sorted(pd.read_csv(out / "track_objectives.csv")["step"].unique()) == [100, 200, 300]


def test_a_step_whose_objectives_were_not_saved_is_recomputed_not_lost(tmp_path: Path, monkeypatch) -> None:
    """The objectives are the commit point, written last: a run killed while a step's files are written recomputes
    that step on the rerun (objectives used to be written first: a kill before the weights and Grams left the
    step counted as done with its weights and Grams missing for good)."""
    import gradconflict.track.run as run_mod

    images = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    full = track_models(_models(), images, SCHEDULE, "eps", _cfg(resamples=1), out_dir=tmp_path / "full", progress=False)
    real = run_mod.write_csv
    calls = {"n": 0}

    def dies_at_the_second_steps_weights(frame, path, *a, **k):
        if Path(path).name == "track_weights.csv":
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt  # killed between two of the step's writes (after its objectives, before)
        return real(frame, path, *a, **k)

    monkeypatch.setattr(run_mod, "write_csv", dies_at_the_second_steps_weights)
    with pytest.raises(KeyboardInterrupt):
        track_models(_models(), images, SCHEDULE, "eps", _cfg(resamples=1), out_dir=tmp_path / "cut", progress=False)
    monkeypatch.setattr(run_mod, "write_csv", real)
    resumed = track_models(_models(), images, SCHEDULE, "eps", _cfg(resamples=1), out_dir=tmp_path / "cut",
                           progress=False)
    for name in ("track_objectives.csv", "track_weights.csv"):
        a = pd.read_csv(tmp_path / "full" / name).drop(columns=["seconds"], errors="ignore")
        b = pd.read_csv(tmp_path / "cut" / name).drop(columns=["seconds"], errors="ignore")
        pd.testing.assert_frame_equal(a, b)
    assert sorted(resumed.grams) == sorted(full.grams)


def test_a_second_process_on_the_same_out_is_refused(tmp_path: Path, capsys) -> None:
    from gradconflict._io import folder_lock
    from gradconflict.cli import main

    out = tmp_path / "busy"
    with folder_lock(out):  # another process holds the folder (flock: a second open file conflicts, same process or not)
        code = main(["track", "--model", "dit-tiny", "--checkpoints", str(tmp_path / "missing.pt"), "--data",
                     "synthetic", "--out", str(out)])
    assert code == 2 and "in use by another gradconflict process" in capsys.readouterr().err
    assert not out.exists()  # the holder created it and wrote nothing: its lock tidies it away
    new = tmp_path / "fresh"
    assert main(["gram", "--model", "dit-tiny", "--data", "synthetic", "--bins", "0", "--out", str(new / "a" / "b")]) == 2
    assert not new.exists()  # an early error leaves no folder (nor lock file, nor the parents it made) behind
    kept = tmp_path / "kept"
    (kept / "a").mkdir(parents=True)
    assert main(["gram", "--model", "dit-tiny", "--data", "synthetic", "--bins", "0", "--out", str(kept / "a" / "b")]) == 2
    assert sorted(p.name for p in kept.iterdir()) == ["a"] and not (kept / "a" / "b").exists()  # what existed stays


def test_a_filesystem_without_flock_runs_unlocked(tmp_path: Path, monkeypatch) -> None:
    """NFS without lockd or Lustre without -o flock answer flock with ENOLCK / ENOSYS: that is no other process."""
    import errno
    import fcntl

    from gradconflict._io import folder_lock

    def no_locks(*a, **k):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with folder_lock(tmp_path / "nfs"):
        (tmp_path / "nfs" / "result.csv").write_text("1")
    assert (tmp_path / "nfs" / "result.csv").read_text() == "1"


def test_track_training_refuses_snapshots_of_another_training_config(tmp_path: Path) -> None:
    from dataclasses import replace

    from gradconflict.reproduce import preset
    from gradconflict.track import stale_tracking, track_training

    config = preset("toy")
    tc, cfg = config.train, config.track
    track_training(tc, cfg, tmp_path, every=3, progress=False)
    assert stale_tracking(tmp_path, tc, cfg) is None
    changed = replace(tc, lr=tc.lr * 10)
    assert stale_tracking(tmp_path, changed, cfg) == "training"
    assert stale_tracking(tmp_path, tc, replace(cfg, per_task=cfg.per_task + 1)) == "tracking"
    with pytest.raises(ValueError, match=r"a training run of another config \(differs in \['lr'\]: lr: [0-9.e-]+ "
                                         r"recorded, [0-9.e-]+ now\)"):
        track_training(changed, cfg, tmp_path, every=3, progress=False)


def test_autocast_tracks_the_bf16_model_and_keeps_earlier_folders_valid(tmp_path: Path) -> None:
    images = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    models = _models()[:1]
    plain = track_models(models, images, SCHEDULE, "eps", _cfg(resamples=1), out_dir=tmp_path / "a", progress=False)
    bf16 = track_models(models, images, SCHEDULE, "eps", _cfg(resamples=1, autocast="bf16"), out_dir=tmp_path / "b",
                        progress=False)
    G, Gb = plain.grams[(0, 0)], bf16.grams[(0, 0)]
    assert 1e-6 < np.linalg.norm(Gb - G) / np.linalg.norm(G) < 5e-2  # bf16 activations: close, not equal
    # the default is left out of the recorded config, so a folder written before the field existed still matches,
    # and a folder tracked without autocast refuses a bf16 rerun
    assert "autocast" not in _cfg().to_dict() and _cfg(autocast="bf16").to_dict()["autocast"] == "bf16"
    with pytest.raises(ValueError, match="another config"):
        track_models(models, images, SCHEDULE, "eps", _cfg(resamples=1, autocast="bf16"), out_dir=tmp_path / "a",
                     progress=False)
    with pytest.raises(ValueError, match="autocast must be one of"):
        _cfg(autocast="fp8")


def test_track_cli_knows_a_checkpoint_by_its_content(tmp_path: Path, monkeypatch) -> None:
    """A copied, moved or touched checkpoint is the same checkpoint (it was refused: path, size and mtime were
    recorded); another file under the tracked name is refused; a folder recorded by mtime resumes and is upgraded."""
    import json
    import os
    import shutil

    import gradconflict.track.run as run_mod
    from gradconflict.cli import main

    spec, paths = _user_model_and_checkpoints(tmp_path)
    out = tmp_path / "out"
    common = ["--model", f"{spec}:build", "--image-size", "8", "--bins", "4", "--per-task", "2", "--resamples", "1",
              "--data", "synthetic", "--out", str(out)]
    assert main(["track", "--checkpoints", paths[0], "--steps", "100", *common]) == 0
    copy = tmp_path / "moved" / "copy.pt"
    copy.parent.mkdir()
    shutil.copy(paths[0], copy)  # new path, new mtime, same bytes
    os.utime(paths[0], ns=(1, 1))  # the original touched
    computed = []
    real = run_mod.task_gram
    monkeypatch.setattr(run_mod, "task_gram", lambda *a, **k: (computed.append(1), real(*a, **k))[1])
    assert main(["track", "--checkpoints", str(copy), "--steps", "100", *common]) == 0
    assert main(["track", "--checkpoints", paths[0], "--steps", "100", *common]) == 0
    assert computed == []  # step 100 was held: nothing recomputed
    shutil.copy(paths[1], paths[0])  # another model under the tracked name
    assert main(["track", "--checkpoints", paths[0], "--steps", "100", *common]) == 2
    # a folder as older versions wrote it: the source by path, size and mtime of the file that is still there
    shutil.copy(copy, paths[0])
    st = Path(paths[0]).resolve().stat()
    legacy = f"{Path(paths[0]).resolve()} ({st.st_size} bytes, mtime {st.st_mtime_ns})"  # the old format, verbatim
    (out / "track_sources.json").write_text(json.dumps({"100": legacy}))
    assert main(["track", "--checkpoints", paths[1], "--steps", "100", *common]) == 2  # another model: still refused
    assert main(["track", "--checkpoints", paths[0], *common]) == 2  # forgot --steps: still caught
    assert main(["track", "--checkpoints", paths[0], "--steps", "100", *common]) == 0
    assert json.loads((out / "track_sources.json").read_text())["100"].startswith("sha256:")
    assert computed == []


def test_extra_strategies_are_known_by_their_weights_and_names_must_be_unique(tmp_path: Path) -> None:
    """A changed custom weighting under the same name is another strategy (a rerun reused the old scores); two
    strategies of one name were averaged into one figure line."""
    from gradconflict import weighting

    images = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    kw = dict(out_dir=tmp_path, progress=False)
    cfg = _cfg(resamples=1, solvers=("auto",))
    gamma5 = weighting.custom(lambda snr: np.minimum(snr, 5.0), name="mine")
    gamma1 = weighting.custom(lambda snr: np.minimum(snr, 1.0), name="mine")
    first = track_models(_models()[:1], images, SCHEDULE, "eps", cfg, extra_strategies=[gamma5], **kw)
    same = track_models(_models()[:1], images, SCHEDULE, "eps", cfg,
                        extra_strategies=[weighting.custom(lambda snr: np.minimum(snr, 5.0), name="mine")], **kw)
    pd.testing.assert_frame_equal(first.objectives, same.objectives)  # the same function again: resumed
    import json

    recorded = json.loads((tmp_path / "track_config.json").read_text())
    (tmp_path / "track_config.json").write_text(json.dumps({**recorded, "extra_strategies": ["mine"]}))  # as before
    again = track_models(_models()[:1], images, SCHEDULE, "eps", cfg, extra_strategies=[gamma5], **kw)
    pd.testing.assert_frame_equal(first.objectives, again.objectives)  # a folder recorded by name resumes
    assert json.loads((tmp_path / "track_config.json").read_text())["extra_strategies"][0].startswith("mine@")
    with pytest.raises(ValueError, match=r"differs in \['extra_strategies'\]"):
        track_models(_models()[:1], images, SCHEDULE, "eps", cfg, extra_strategies=[gamma1], **kw)
    with pytest.raises(ValueError, match=r"\['snr'\] appear more than once"):
        track_models(_models()[:1], images, SCHEDULE, "eps", cfg, progress=False,
                     extra_strategies=[weighting.custom(lambda snr: snr, name="snr")])
    with pytest.raises(ValueError, match=r"\['<lambda>'\] appear more than once"):
        track_models(_models()[:1], images, SCHEDULE, "eps", cfg, progress=False,
                     extra_strategies=[lambda snr: snr, lambda snr: 1.0 + 0 * snr])
    plain = track_models(_models()[:1], images, SCHEDULE, "eps", cfg, progress=False,
                         extra_strategies=[lambda snr: np.minimum(snr, 5.0)])  # a plain function is taken as it is
    mine = first.objectives[first.objectives["name"] == "mine"]["objective"].to_numpy()
    np.testing.assert_allclose(plain.objectives[plain.objectives["name"] == "<lambda>"]["objective"], mine, rtol=1e-12)
