"""Batched fine-tuning with a captured CUDA graph (transfer/cudagraph.py) equals the eager and sequential runs.

The CUDA cases run where CUDA is present (``benchmarks/gpu_check.py`` runs this file on a lent GPU); the switch
itself is checked everywhere."""

from __future__ import annotations

import pytest
import torch

import gradconflict as gc
from gradconflict.models import build_model
from gradconflict.transfer import BatchStream, TransferConfig, finetune_sequential, finetune_stacked
from gradconflict.transfer.cudagraph import GRAPH_WARMUP, GraphedStep, cuda_graphs_enabled
from gradconflict.transfer.stacked import sources_of
from test_transfer import SCHEDULE, Tiny

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_graphs_are_used_only_on_cuda_with_steps_after_the_warmup(monkeypatch) -> None:
    monkeypatch.delenv("GRADCONFLICT_CUDA_GRAPHS", raising=False)
    assert not cuda_graphs_enabled(torch.device("cpu"), 100)
    assert cuda_graphs_enabled(torch.device("cuda"), GRAPH_WARMUP + 1)
    assert not cuda_graphs_enabled(torch.device("cuda"), GRAPH_WARMUP)  # nothing left to replay
    monkeypatch.setenv("GRADCONFLICT_CUDA_GRAPHS", "0")
    assert not cuda_graphs_enabled(torch.device("cuda"), 100)
    monkeypatch.setenv("GRADCONFLICT_CUDA_GRAPHS", "maybe")
    with pytest.raises(ValueError, match="GRADCONFLICT_CUDA_GRAPHS must be 0 or 1"):
        cuda_graphs_enabled(torch.device("cuda"), 100)


def _spy(monkeypatch) -> list:
    """Record what each capture returned (None: it failed and the run went on eagerly)."""
    captured: list = []
    original = GraphedStep.capture.__func__

    def capture(cls, *args, **kwargs):
        graphed = original(cls, *args, **kwargs)
        captured.append(graphed)
        return graphed

    monkeypatch.setattr(GraphedStep, "capture", classmethod(capture))
    return captured


def _run(model, data, bins, cfg, fn):
    streams = [BatchStream(s, 100 + k, data, None, cfg.batch_size) for k, s in enumerate(sources_of(bins))]
    return fn(model, streams, cfg, SCHEDULE, model.config.prediction if hasattr(model, "config") else "eps")


@cuda
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_graphed_float64_run_equals_the_eager_and_the_sequential_runs(optimizer: str, monkeypatch) -> None:
    torch.manual_seed(0)
    model = Tiny().double().cuda()
    data = (torch.rand(40, 1, 8, 8, dtype=torch.float64) * 2 - 1).cuda()
    bins = gc.TimestepBins.uniform(1000, 3)
    cfg = TransferConfig(steps=GRAPH_WARMUP + 5, lr=1e-2, optimizer=optimizer, batch_size=5, grad_clip=0.05,
                         weight_decay=0.1, progress=False)
    seq = _run(model, data, bins, cfg, finetune_sequential)
    monkeypatch.setenv("GRADCONFLICT_CUDA_GRAPHS", "0")
    eager = _run(model, data, bins, cfg, finetune_stacked)
    monkeypatch.delenv("GRADCONFLICT_CUDA_GRAPHS")
    captured = _spy(monkeypatch)
    bat = _run(model, data, bins, cfg, finetune_stacked)
    assert len(captured) == 1 and captured[0] is not None  # the replayed steps ran
    start = dict(model.named_parameters())
    moved = max(float((seq.params[n] - start[n].detach()).abs().max()) for n in seq.params)
    assert moved > 1e-4  # the replays really stepped
    for name in seq.params:
        # replays are the eager stacked step exactly (both use the capturable optimiser)
        torch.testing.assert_close(bat.params[name], eager.params[name], rtol=0, atol=1e-12)
        # the sequential reference keeps torch's usual AdamW, whose bias correction is computed in Python floats
        # rather than float32 step tensors: about 1e-5 of the movement; SGD has none and matches to rounding
        tol = 1e-4 * moved if optimizer == "adamw" else 1e-10
        torch.testing.assert_close(bat.params[name], seq.params[name], rtol=0, atol=tol)
    torch.testing.assert_close(torch.as_tensor(bat.losses), torch.as_tensor(eager.losses), rtol=0, atol=1e-12)


@cuda
def test_graphed_dit_with_attention_equals_the_eager_batched_run(monkeypatch) -> None:
    torch.manual_seed(0)
    model = build_model("dit-tiny").cuda().eval()
    data = torch.rand(64, 1, model.config.image_size, model.config.image_size).cuda() * 2 - 1
    bins = gc.TimestepBins.uniform(1000, 4)
    cfg = TransferConfig(steps=GRAPH_WARMUP + 4, lr=1e-3, batch_size=4, grad_clip=1.0, progress=False)
    monkeypatch.setenv("GRADCONFLICT_CUDA_GRAPHS", "0")
    eager = _run(model, data, bins, cfg, finetune_stacked)
    monkeypatch.delenv("GRADCONFLICT_CUDA_GRAPHS")
    captured = _spy(monkeypatch)
    graphed = _run(model, data, bins, cfg, finetune_stacked)
    assert len(captured) == 1 and captured[0] is not None
    start = dict(model.named_parameters())
    for name in eager.params:
        movement = float((eager.params[name] - start[name].detach()).abs().max())
        diff = float((graphed.params[name] - eager.params[name]).abs().max())
        assert diff <= 1e-3 * movement + 1e-7, name  # the same kernels: float32 rounding at most
