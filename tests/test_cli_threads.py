"""``--threads`` on every command: the count is used while the command runs, recorded, and restored after;
``gram`` records and prints the schedule, prediction and data it used, and shows a progress line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gradconflict.cli import build_parser, main
from gradconflict.cli import _threads

GRAM = ["gram", "--model", "dit-tiny", "--data", "synthetic", "--bins", "2", "--per-task", "1"]


@pytest.mark.parametrize("command", ["gram", "track", "transfer", "bins", "solve", "sample", "train", "reproduce",
                                     "compare"])
def test_every_command_takes_threads(command: str) -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    assert any("--threads" in a.option_strings for a in sub._actions), command


def test_gram_uses_and_records_the_thread_count_and_restores_it(tmp_path: Path, monkeypatch, capsys) -> None:
    seen = []
    import gradconflict.engine as engine

    real = engine.task_gram

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "task_gram", spy)
    before = torch.get_num_threads()
    wanted = 2 if before != 2 else 3
    assert main([*GRAM, "--threads", str(wanted), "--no-progress", "--out", str(tmp_path / "g")]) == 0
    assert seen == [wanted] and torch.get_num_threads() == before
    saved = json.loads((tmp_path / "g" / "gram_config.json").read_text())
    assert saved["threads"] == wanted and "_torch_threads" not in saved
    # the schedule, prediction and data it used (dit-tiny without a checkpoint: linear, T = 1000, eps, 16x16)
    assert saved["schedule"] == "linear (T = 1000)" and saved["T"] == 1000 and saved["prediction"] == "eps"
    assert saved["dataset"]["N"] > 0 and saved["dataset"]["shape"] == [1, 16, 16]
    assert saved["dataset"]["path"] == "synthetic"
    err = capsys.readouterr().err
    assert "schedule linear (T = 1000), eps prediction" in err and "images of 1x16x16" in err


def test_default_threads_follow_the_machine(monkeypatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(_threads.os, "cpu_count", lambda: 2)
    assert _threads.default_threads() == 1
    monkeypatch.setattr(_threads.os, "cpu_count", lambda: 32)
    assert _threads.default_threads() == torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.setattr(_threads.os, "cpu_count", lambda: 2)
    assert _threads.default_threads() == torch.get_num_threads()


def test_bad_thread_counts_are_refused(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        main([*GRAM, "--threads", "0", "--out", str(tmp_path / "g")])
    assert "use --threads 1 or more" in capsys.readouterr().err


def test_schedule_descriptions() -> None:
    from gradconflict.cli.gram import describe_schedule
    from gradconflict.schedule import NoiseSchedule

    assert describe_schedule(NoiseSchedule.cosine(50)) == "cosine (T = 50)"

    class DDPMScheduler:  # duck-typed like diffusers'
        alphas_cumprod = NoiseSchedule.linear(10).alphas_cumprod

    assert describe_schedule(NoiseSchedule.from_diffusers(DDPMScheduler())) == \
        "from diffusers scheduler DDPMScheduler (T = 10)"


def test_gram_shows_a_progress_line_unless_told_not_to(tmp_path: Path, capsys, monkeypatch) -> None:
    import gradconflict.cli.gram as gram

    monkeypatch.setattr(gram, "PROGRESS_DELAY_S", 0.0)  # shown from the start (else after a second)
    assert main([*GRAM, "--out", str(tmp_path / "a")]) == 0
    assert "Gram of 2 bins x 1 samples" in capsys.readouterr().err
    assert main([*GRAM, "--no-progress", "--out", str(tmp_path / "b")]) == 0
    assert "Gram of 2 bins" not in capsys.readouterr().err
