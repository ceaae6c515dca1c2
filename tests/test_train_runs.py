"""Training runs as tracking sources: kept checkpoints (``keep_checkpoints``) equal the weights of shorter runs,
survive a resume, and ``gradconflict track --model RUN`` tracks them all at their steps."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from gradconflict.cli import main as cli_main
from gradconflict.train import TrainConfig, run_checkpoints, train
from gradconflict.train.checkpoint import weights_metadata

# a very small DiT on 8x8 synthetic images: a fraction of a second per step
SMALL = dict(data="synthetic", data_limit=32, model="dit-tiny", model_overrides={"hidden_size": 16, "depth": 1},
             image_size=8, batch_size=4, warmup_steps=2, log_every=1, checkpoint_every=2, bins=2, T=100)
TRACK = ["--data", "synthetic", "--image-size", "8", "--bins", "2", "--per-task", "1", "--resamples", "1",
         "--ugd-steps", "20", "--strategies", "constant", "min_snr:5"]


def _same(a: Path, b: Path) -> bool:
    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_kept_checkpoints_equal_shorter_runs_and_survive_a_resume(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(TrainConfig(**SMALL, steps=3, keep_checkpoints=True), run, progress=False)
    train(TrainConfig(**SMALL, steps=5, keep_checkpoints=True), run, progress=False)  # resume to 5
    kept = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert kept == ["step2.safetensors", "step4.safetensors"]
    for step in (2, 4):  # independent reference: a run trained to exactly that step
        ref = tmp_path / f"ref{step}"
        train(TrainConfig(**SMALL, steps=step), ref, progress=False)
        path = run / "checkpoints" / f"step{step}.safetensors"
        assert _same(path, ref / "model.safetensors")
        assert json.loads(weights_metadata(path)["step"]) == step
        assert any(k.startswith("ema.") for k in load_file(str(path)))
    assert not (tmp_path / "ref2" / "checkpoints").exists()  # off by default
    assert [(s, p.name) for s, p in run_checkpoints(run)] == [
        (2, "step2.safetensors"), (4, "step4.safetensors"), (5, "model.safetensors")]


def test_an_interrupted_save_gets_its_kept_copy_on_resume(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(TrainConfig(**SMALL, steps=4, keep_checkpoints=True), run, progress=False)
    (run / "checkpoints" / "step4.safetensors").unlink()  # as if interrupted after model.safetensors
    train(TrainConfig(**SMALL, steps=4, keep_checkpoints=True), run, progress=False)
    assert _same(run / "checkpoints" / "step4.safetensors", run / "model.safetensors")


def test_cli_train_keep_checkpoints_then_track_the_run(tmp_path: Path, capsys) -> None:
    run, out = tmp_path / "run", tmp_path / "track"
    code = cli_main(["train", "--data", "synthetic", "--data-limit", "32", "--model", "dit-tiny", "--model-overrides",
                     '{"hidden_size": 16, "depth": 1}', "--image-size", "8", "--batch-size", "4", "--T", "100",
                     "--bins", "2", "--steps", "5", "--checkpoint-every", "2", "--keep-checkpoints", "--quiet",
                     "--out", str(run)])
    assert code == 0
    assert cli_main(["track", "--model", str(run), *TRACK, "--out", str(out)]) == 0
    assert "at steps [2, 4, 5]" in capsys.readouterr().err
    obj = pd.read_csv(out / "track_objectives.csv")
    assert sorted(obj["step"].unique()) == [2, 4, 5]


def test_track_without_checkpoints_needs_a_run(tmp_path: Path, capsys) -> None:
    assert cli_main(["track", "--model", "dit-tiny", *TRACK, "--out", str(tmp_path / "t")]) == 2
    assert "--checkpoints is missing" in capsys.readouterr().err
    with pytest.raises(ValueError, match="holds no model.safetensors"):
        run_checkpoints(tmp_path)


USER_MODEL = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Conv2d(1, 8, 3, padding=1)
        self.time = nn.Linear(1, 8)
        self.out = nn.Conv2d(8, 1, 3, padding=1)

    def forward(self, x, t, y=None):
        h = self.inp(x) + self.time(t.float().view(-1, 1) / 100).view(-1, 8, 1, 1)
        return self.out(torch.nn.functional.silu(h))


def build():
    return Net()
'''


def _user_spec(folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "mymodel.py").write_text(USER_MODEL)
    return f"{folder / 'mymodel.py'}:build"


USER = {**SMALL, "model_overrides": {}}


def test_a_user_model_trains_resumes_bit_exactly_and_reloads(tmp_path: Path, monkeypatch) -> None:
    from gradconflict.train import load_trained

    spec = _user_spec(tmp_path / "code")
    full = TrainConfig(**{**USER, "model": spec}, steps=6)
    train(full, tmp_path / "full", progress=False)
    train(TrainConfig(**{**USER, "model": spec}, steps=3), tmp_path / "ext", progress=False)
    monkeypatch.chdir(tmp_path / "code")  # the same file given relative is the same run
    train(TrainConfig(**{**USER, "model": "mymodel.py:build"}, steps=6), tmp_path / "ext", progress=False)
    assert _same(tmp_path / "full" / "model.safetensors", tmp_path / "ext" / "model.safetensors")
    meta = json.loads(weights_metadata(tmp_path / "full" / "model.safetensors")["model_spec"])
    assert meta == {"spec": spec, "seed": 0}
    model, schedule, prediction = load_trained(tmp_path / "full", ema=False)
    assert type(model).__name__ == "Net" and prediction == "eps" and schedule.T == 100
    raw = load_file(str(tmp_path / "full" / "model.safetensors"))
    assert all(torch.equal(v, raw[k]) for k, v in model.state_dict().items())
    # the EMA is the warmed-up average of the raw weights: different from them after 6 steps
    ema_model = load_trained(tmp_path / "full", ema=True)[0]
    assert not all(torch.equal(a, b) for a, b in zip(ema_model.state_dict().values(), model.state_dict().values()))
    (tmp_path / "code" / "mymodel.py").unlink()
    with pytest.raises(FileNotFoundError, match="does not exist any more: put it back"):
        load_trained(tmp_path / "full")


def test_user_model_config_is_checked(tmp_path: Path) -> None:
    spec = _user_spec(tmp_path)
    with pytest.raises(ValueError, match="apply to built-in models only"):
        TrainConfig(**{**SMALL, "model": spec})
    with pytest.raises(ValueError, match="unknown model 'dit-huge'"):
        TrainConfig(**{**SMALL, "model": "dit-huge"})


def _readme_commands() -> list[list[str]]:
    """The two commands of the README section "Train your own model and track all its checkpoints"."""
    import re
    import shlex

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### Train your own model and track all its checkpoints", 1)[1].split("\n### ", 1)[0]
    block = re.findall(r"```bash\n(.*?)```", section, flags=re.S)[0].replace("\\\n", " ")
    return [shlex.split(line)[1:] for line in block.strip().splitlines()]


def _tiny(argv: list[str], values: dict[str, str]) -> list[str]:
    """``argv`` with the given flags' values replaced (a tiny run of the same command)."""
    out = list(argv)
    for i, word in enumerate(out[:-1]):
        if word in values:
            out[i + 1] = values[word]
    return out


def test_the_readme_example_trains_a_user_file_spec_and_tracks_all_its_checkpoints(tmp_path: Path, capsys,
                                                                                  monkeypatch) -> None:
    """The README example as written (tiny sizes): train --model mymodel.py:build --keep-checkpoints, then
    track --model RUN with no --checkpoints."""
    (train_cmd, track_cmd) = _readme_commands()
    assert train_cmd[:3] == ["train", "--model", "mymodel.py:build"] and "--keep-checkpoints" in train_cmd
    assert track_cmd[:3] == ["track", "--model", "runs/mine"] and "--checkpoints" not in track_cmd
    _user_spec(tmp_path)
    monkeypatch.chdir(tmp_path)
    tiny = {"--data": "synthetic", "--image-size": "8", "--steps": "4", "--checkpoint-every": "2", "--bins": "2",
            "--per-task": "1"}
    code = cli_main(_tiny(train_cmd, tiny) + ["--data-limit", "32", "--batch-size", "4", "--T", "100", "--bins", "2",
                                              "--quiet"])
    assert code == 0
    assert "checkpoints/step*.safetensors" in capsys.readouterr().out
    assert cli_main(_tiny(track_cmd, tiny) + TRACK[6:]) == 0
    assert "at steps [2, 4]" in capsys.readouterr().err
    obj = pd.read_csv(tmp_path / "runs" / "mine-track" / "track_objectives.csv")
    assert sorted(obj["step"].unique()) == [2, 4]
    recorded = json.loads((tmp_path / "runs" / "mine" / "config.json").read_text())["model"]
    assert recorded == f"{(tmp_path / 'mymodel.py').resolve()}:build"


def test_a_local_diffusers_model_is_fine_tuned_and_reloads(tmp_path: Path) -> None:
    diffusers = pytest.importorskip("diffusers")
    from gradconflict.adapters import DiffusersModel
    from gradconflict.train import load_trained

    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                 block_out_channels=(8, 16), norm_num_groups=4,
                                 down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    unet.save_pretrained(tmp_path / "pipe" / "unet")
    diffusers.DDPMScheduler(num_train_timesteps=100).save_pretrained(tmp_path / "pipe" / "scheduler")
    start = {f"model.{k}": v.clone() for k, v in unet.state_dict().items()}
    cfg = dict(data="synthetic", data_limit=16, image_size=8, batch_size=4, T=100, bins=2, checkpoint_every=2)
    train(TrainConfig(**cfg, model=f"diffusers:{tmp_path / 'pipe'}", steps=2), tmp_path / "run", progress=False)
    model, schedule, prediction = load_trained(tmp_path / "run", ema=False)
    raw = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert isinstance(model, DiffusersModel) and schedule.T == 100 and prediction == "eps"
    assert all(torch.equal(v, raw[k]) for k, v in model.state_dict().items())
    assert not all(torch.equal(start[k], raw[k]) for k in start)  # fine-tuned from the saved weights


def test_sampling_a_user_model_without_a_config_says_what_is_missing() -> None:
    from torch import nn

    from gradconflict.schedule import NoiseSchedule
    from gradconflict.train import sample

    with pytest.raises(ValueError, match="cannot tell the sample shape of a Conv2d"):
        sample(nn.Conv2d(1, 1, 1), NoiseSchedule.linear(10), "eps", n=1, steps=2)
