"""Cross-bin transfer matrix: first-order agreement, batched == sequential, common random numbers, errors, CLI."""

from __future__ import annotations

import argparse
import math
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import gradconflict as gc
from gradconflict.transfer import (
    BatchStream,
    TransferConfig,
    draw_eval_set,
    evaluate_losses,
    finetune_sequential,
    finetune_stacked,
    plot_transfer,
    transfer_matrix,
)
from gradconflict.transfer.stacked import sources_of

SCHEDULE = gc.NoiseSchedule.linear()


class Tiny(nn.Module):
    """Conv2d + GroupNorm + SiLU + Conv2d with a Linear sinusoidal time embedding (8x8, one channel)."""

    def __init__(self, ch: int = 8, batchnorm: bool = False) -> None:
        super().__init__()
        self.ch = ch
        self.c1 = nn.Conv2d(1, ch, 3, padding=1)
        self.norm = nn.BatchNorm2d(ch) if batchnorm else nn.GroupNorm(2, ch)
        self.temb = nn.Linear(ch, ch)
        self.c2 = nn.Conv2d(ch, 1, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        half = self.ch // 2
        freqs = torch.exp(-math.log(1000.0) * torch.arange(half, dtype=x.dtype, device=x.device) / half)
        ang = t.to(x.dtype)[:, None] * freqs[None] / 10
        e = self.temb(torch.cat([ang.sin(), ang.cos()], 1))
        return self.c2(F.silu(self.norm(self.c1(x)) + e[:, :, None, None]))


class Frozen(Tiny):
    """All real weights frozen; one trainable parameter that enters the output multiplied by 0 (zero gradient)."""

    def __init__(self) -> None:
        super().__init__()
        for p in self.parameters():
            p.requires_grad_(False)
        self.dummy = nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(x, t) + 0.0 * self.dummy.sum()


def _setup(dtype: torch.dtype = torch.float64, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    model = Tiny().to(dtype)
    data = torch.rand(40, 1, 8, 8, dtype=dtype) * 2 - 1
    return model, data


def _rel(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(a - ref).max() / np.abs(ref).max())


def test_lookahead_step_matches_the_first_order_gram_prediction() -> None:
    model, data = _setup()
    bins = gc.TimestepBins.uniform(1000, 4)
    kw = dict(mode="lookahead", eval_samples=8, batch_size=8, schedule=SCHEDULE, prediction="v", progress=False)
    res = transfer_matrix(model, data, bins, lr=1e-3, **kw)
    T, G1 = res.matrix, res.first_order
    tol = 1e-2  # |transfer - first order| <= 1e-2 * max|first order|; the remainder is O(lr) (2.6e-3 measured)
    assert _rel(T, G1) < tol
    assert _rel(T, 2 * G1) > tol and _rel(T, -G1) > tol  # wrong factor, wrong sign
    assert _rel(T, G1.T) > tol  # transposed: L_j in the denominator makes the prediction non-symmetric
    # the remainder is second order: ten times the step gives about ten times the relative error
    big = transfer_matrix(model, data, bins, lr=1e-2, **kw)
    assert 5.0 < _rel(big.matrix, big.first_order) / _rel(T, G1) < 20.0
    assert res.all_row is not None and np.isfinite(res.frame["first_order"]).all()


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_batched_fine_tuning_equals_sequential(optimizer: str) -> None:
    model, data = _setup()
    bins = gc.TimestepBins.uniform(1000, 3)
    cfg = TransferConfig(steps=4, lr=1e-2, optimizer=optimizer, batch_size=5, grad_clip=0.05, weight_decay=0.1, progress=False)

    def streams() -> list[BatchStream]:
        return [BatchStream(s, 100 + k, data, None, cfg.batch_size) for k, s in enumerate(sources_of(bins))]

    seq = finetune_sequential(model, streams(), cfg, SCHEDULE, "eps")
    bat = finetune_stacked(model, streams(), cfg, SCHEDULE, "eps")
    assert seq.params.keys() == bat.params.keys()
    for name in seq.params:
        torch.testing.assert_close(bat.params[name], seq.params[name], rtol=0, atol=1e-10)
    np.testing.assert_allclose(bat.losses, seq.losses, rtol=0, atol=1e-10)
    # the clip was active (a run without it ends elsewhere) and the copies really differ from each other
    free = finetune_stacked(model, streams(), TransferConfig(**{**cfg.__dict__, "grad_clip": None}), SCHEDULE, "eps")
    assert max(float((free.params[n] - bat.params[n]).abs().max()) for n in bat.params) > 1e-6
    w = bat.params["c1.weight"]
    assert float((w[0] - w[1]).abs().max()) > 1e-6


def test_common_random_numbers_give_exactly_zero_transfer_without_change() -> None:
    torch.manual_seed(0)
    model = Frozen().double()
    data = torch.rand(30, 1, 8, 8, dtype=torch.float64) * 2 - 1
    bins = gc.TimestepBins.uniform(1000, 3)
    eval_set = draw_eval_set(data, None, bins, 6, 3, device=torch.device("cpu"), dtype=torch.float64)
    a = evaluate_losses(model, eval_set, SCHEDULE, "eps")
    b = evaluate_losses(model, eval_set, SCHEDULE, "eps")
    assert torch.equal(a, b)
    # end to end: the only trainable parameter gets a zero gradient, so every copy equals theta_0
    for batched in (True, False):
        res = transfer_matrix(model, data, bins, steps=3, lr=1e-2, eval_samples=6, seeds=2, schedule=SCHEDULE,
                              prediction="eps", batched=batched, progress=False)
        assert (res.frame["transfer"] == 0.0).all() and (res.frame["loss_before"] > 0).all()
    # and the seeds really draw different evaluation sets
    other = draw_eval_set(data, None, bins, 6, 4, device=torch.device("cpu"), dtype=torch.float64)
    assert not torch.equal(evaluate_losses(model, other, SCHEDULE, "eps"), a)


@pytest.mark.parametrize("kwargs, match", [
    (dict(steps=0), "steps must be a positive"),
    (dict(steps=-2), "steps must be a positive"),
    (dict(lr=0.0), "lr must be > 0"),
    (dict(lr=-1e-3), "lr must be > 0"),
    (dict(eval_samples=0), "eval_samples must be a positive"),
    (dict(batch_size=0), "batch_size must be a positive"),
    (dict(seeds=0), "seeds must be >= 1"),
    (dict(mode="lookahead", steps=5), "exactly one SGD step"),
    (dict(mode="bogus"), "unknown mode"),
])
def test_invalid_settings_raise_clear_errors(kwargs: dict, match: str) -> None:
    model, data = _setup()
    args = dict(steps=2, lr=1e-3, schedule=SCHEDULE, prediction="eps", progress=False)
    with pytest.raises(ValueError, match=match):
        transfer_matrix(model, data, gc.TimestepBins.uniform(1000, 2), **{**args, **kwargs})


def test_batchnorm_and_nan_models_are_refused() -> None:
    bins = gc.TimestepBins.uniform(1000, 2)
    data = torch.rand(10, 1, 8, 8) * 2 - 1
    with pytest.raises(ValueError, match="BatchNorm"):
        transfer_matrix(Tiny(batchnorm=True).train(), data, bins, steps=1, lr=1e-3, schedule=SCHEDULE, prediction="eps", progress=False)
    model = Tiny()
    with torch.no_grad():
        model.c2.bias.fill_(float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        transfer_matrix(model, data, bins, steps=1, lr=1e-3, schedule=SCHEDULE, prediction="eps", progress=False)
    cfg = TransferConfig(steps=1, lr=1e-3, progress=False)
    streams = [BatchStream(s, k, data, None, 4) for k, s in enumerate(sources_of(bins))]
    with pytest.raises(ValueError, match="fine-tuning loss is NaN"):
        finetune_stacked(model, streams, cfg, SCHEDULE, "eps")


def test_small_run_has_the_documented_shapes_and_writes_a_figure(tmp_path: Path) -> None:
    model, data = _setup(torch.float32)
    bins = gc.TimestepBins.uniform(1000, 3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    res = transfer_matrix(model, data, bins, steps=3, lr=1e-2, eval_samples=8, seeds=2, schedule=SCHEDULE,
                          prediction="eps", first_order=True, progress=False)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # theta_0 untouched
    assert res.matrix.shape == res.stderr.shape == res.first_order.shape == (3, 3)
    assert np.isfinite(res.matrix).all() and np.isfinite(res.stderr).all() and (res.stderr > 0).all()
    assert res.all_row.shape == (3,) and res.labels == bins.labels and res.batched
    for col in ["seed", "source", "source_label", "target", "target_label", "loss_before", "loss_after", "transfer", "first_order"]:
        assert col in res.frame.columns
    assert len(res.frame) == 2 * 4 * 3 and set(res.frame["source_label"]) == {*bins.labels, "all"}
    assert len(res.reach_lines()) == 3
    png = plot_transfer(res, tmp_path / "fig.png", setup="tiny test")
    assert png.stat().st_size > 0 and len(pd.read_csv(tmp_path / "fig.csv")) == 4 * 3
    one = transfer_matrix(model, data, bins, steps=1, lr=1e-2, eval_samples=4, seeds=1, schedule=SCHEDULE,
                          prediction="eps", include_all=False, progress=False)
    assert np.isnan(one.stderr).all() and one.all_row is None


def test_cli_writes_the_documented_files(tmp_path: Path, capsys) -> None:
    from gradconflict.cli import transfer as cli

    spec = tmp_path / "mymodel.py"
    spec.write_text(textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})
        import torch, gradconflict as gc
        from test_transfer import Tiny

        def build():
            torch.manual_seed(0)
            return Tiny(), gc.NoiseSchedule.linear(), "eps"
    """))
    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "out"
    args = parser.parse_args(["transfer", "--model", f"{spec}:build", "--data", "synthetic", "--image-size", "8",
                              "--data-limit", "32", "--bins", "3", "--steps", "2", "--lr", "1e-3", "--eval-samples", "4",
                              "--seeds", "2", "--out", str(out), "--quiet"])
    assert args.handler(args) == 0
    for name in ["transfer.csv", "transfer_matrix.csv", "transfer_summary.csv", "transfer.png"]:
        assert (out / name).stat().st_size > 0
    matrix = pd.read_csv(out / "transfer_matrix.csv", index_col=0)
    assert list(matrix.columns) == ["0-332", "333-666", "667-999"] and matrix.shape == (3, 3)
    text = capsys.readouterr().out
    assert "bin 0-332:" in text and "hurts" in text


_DIST_SCRIPT = """
import sys
import torch
sys.path.insert(0, sys.argv[2])
import gradconflict as gc
from gradconflict import distributed
from test_transfer import _run_for_distributed

distributed.init_from_env()
res = _run_for_distributed()
if distributed.is_main():
    res.frame.to_pickle(sys.argv[1])
distributed.shutdown()
"""


def _run_for_distributed():
    model, data = _setup()
    return transfer_matrix(model, data, gc.TimestepBins.uniform(1000, 3), steps=2, lr=1e-2, eval_samples=4, seeds=1,
                           batch_size=4, schedule=SCHEDULE, prediction="eps", first_order=True, progress=False)


def test_two_ranks_share_the_copies_and_give_the_single_process_result(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    script = tmp_path / "dist_transfer.py"
    script.write_text(_DIST_SCRIPT)
    out = tmp_path / "frame.pkl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), str(out),
           str(Path(__file__).parent)]
    env = {**os.environ, "GRADCONFLICT_DIST_TIMEOUT": "60", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got, ref = pd.read_pickle(out), _run_for_distributed().frame
    np.testing.assert_allclose(got["transfer"], ref["transfer"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(got["first_order"], ref["first_order"], rtol=1e-9, atol=1e-15)


def test_prefetched_blocks_draw_exactly_what_successive_batches_draw() -> None:
    bins = gc.TimestepBins.uniform(1000, 2)
    data = torch.rand(10, 1, 8, 8) * 2 - 1
    labels = torch.arange(10) % 3
    source = sources_of(bins)[1]
    one, block = BatchStream(source, 5, data, labels, 4), BatchStream(source, 5, data, labels, 4)
    x0, t, noise, kw = block.next_block(3)
    for j in range(3):
        a = one.next()
        assert torch.equal(a[0], x0[j]) and torch.equal(a[1], t[j]) and torch.equal(a[2], noise[j])
        assert torch.equal(a[3]["y"], kw["y"][j])
    assert torch.equal(one.next()[2], block.next()[2])  # the generators stay in step afterwards


@pytest.mark.parametrize("block", [1, 2, 16])
def test_a_loss_that_turns_nan_mid_run_is_reported_at_its_step(monkeypatch, block: int) -> None:
    """The batched loop checks losses once per prefetched block; the error must still name the first bad step."""
    from gradconflict.transfer import stacked

    monkeypatch.setattr(stacked, "_block_steps", lambda streams, steps: block)
    bins = gc.TimestepBins.uniform(1000, 2)
    data = torch.rand(10, 1, 8, 8, dtype=torch.float64) * 2 - 1
    cfg = TransferConfig(steps=6, lr=1e30, optimizer="sgd", progress=False)  # diverges after a few steps
    messages = []
    for run in (finetune_stacked, finetune_sequential):
        streams = [BatchStream(s, k, data, None, 4) for k, s in enumerate(sources_of(bins))]
        with pytest.raises(ValueError, match=r"fine-tuning loss is NaN or Inf at step (\d+)") as err:
            run(Tiny().double(), streams, cfg, SCHEDULE, "eps")
        messages.append(str(err.value))
    step = [int(m.split("at step ")[1].split()[0]) for m in messages]
    assert step[0] > 0 and step[0] == step[1]


def test_an_interrupted_run_resumes_after_its_last_finished_seed(tmp_path: Path, monkeypatch) -> None:
    """Seeds are independent: a run stopped after seed 0 and started again with the same resume folder skips
    seed 0 and gives the rows of an uninterrupted run; other inputs in the same folder are refused."""
    import gradconflict.transfer.matrix as matrix

    model, data = _setup()
    bins = gc.TimestepBins.uniform(1000, 2)
    kw = dict(steps=2, lr=1e-2, eval_samples=4, seeds=3, schedule=SCHEDULE, prediction="eps", progress=False)
    full = transfer_matrix(model, data, bins, **kw)
    real, calls = matrix.finetune_copies, []

    def stop_at_second_seed(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(matrix, "finetune_copies", stop_at_second_seed)
    with pytest.raises(KeyboardInterrupt):
        transfer_matrix(model, data, bins, resume_dir=tmp_path, **kw)
    assert sorted(pd.read_csv(tmp_path / "transfer_seeds.csv")["seed"].unique()) == [0]
    calls.clear()
    monkeypatch.setattr(matrix, "finetune_copies", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    resumed = transfer_matrix(model, data, bins, resume_dir=tmp_path, **kw)
    assert len(calls) == 2  # seeds 1 and 2 only
    cols = ["seed", "source", "target", "loss_before", "loss_after", "transfer"]
    got = resumed.frame[cols].sort_values(["seed", "source", "target"]).to_numpy(dtype=float)
    ref = full.frame[cols].sort_values(["seed", "source", "target"]).to_numpy(dtype=float)
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match=r"transfer results of another run \(differs in \['lr'\]: lr: 0.01 recorded, "
                                         r"0.02 now\)"):
        transfer_matrix(model, data, bins, resume_dir=tmp_path, **{**kw, "lr": 2e-2})
    other, _ = _setup(seed=1)
    with pytest.raises(ValueError, match=r"differs in \['model'\]"):
        transfer_matrix(other, data, bins, resume_dir=tmp_path, **kw)
