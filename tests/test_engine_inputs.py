"""Bad input to ``task_gram`` gets a ValueError that names the problem and the fix (not a raw torch error)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

import gradconflict as gc
from gradconflict.engine import task_gram

SCHEDULE = gc.NoiseSchedule.linear(T=1000)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


class Recurrent(nn.Module):
    """A GRU: the fused engine has no rule for it, and torch.func cannot vmap its fused kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(6, 6, batch_first=True)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.gru(x)[0]


def _batch(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 6, generator=g, dtype=dtype)
    return x0, torch.tensor([1, 2, 800, 900]), torch.tensor([0, 0, 1, 1])


def test_dtype_mismatch_names_both_dtypes_and_the_fix() -> None:
    # data finer than the model is not rounded down silently (coarser data is noised in the model's dtype, #15)
    x0, t, task = _batch(torch.float64)
    with pytest.raises(ValueError, match=r"x_t of dtype torch.float64.*parameters are torch.float32.*x0.to"):
        task_gram(Net(), x0, t, task, schedule=SCHEDULE)


def test_numpy_x0_is_refused_with_the_conversion() -> None:
    x0, t, task = _batch()
    with pytest.raises(ValueError, match=r"x0 must be a torch.Tensor.*ndarray.*torch.as_tensor"):
        task_gram(Net().double(), x0.numpy(), t, task, schedule=SCHEDULE)


def test_a_diffusers_style_scheduler_is_accepted_as_the_schedule() -> None:
    x0, t, task = _batch()
    model = Net().double()
    noise = torch.randn(x0.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    scheduler = type("Scheduler", (), {"alphas_cumprod": torch.tensor(SCHEDULE.alphas_cumprod)})()
    got = task_gram(model, x0, t, task, schedule=scheduler, noise=noise)
    ref = task_gram(model, x0, t, task, schedule=SCHEDULE, noise=noise)
    assert torch.allclose(got.gram, ref.gram, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="schedule must be a gradconflict.NoiseSchedule"):
        task_gram(model, x0, t, task, schedule=np.linspace(0.9, 0.1, 1000))


@pytest.mark.parametrize("budget", [0, -5])
def test_non_positive_memory_budget_is_refused(budget: int) -> None:
    x0, t, task = _batch()
    with pytest.raises(ValueError, match="max_chunk_elements must be a positive"):
        task_gram(Net().double(), x0, t, task, schedule=SCHEDULE, max_chunk_elements=budget)


def test_a_layer_the_fallback_cannot_vmap_points_to_the_loop() -> None:
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, 6, generator=g)
    t, task = torch.tensor([1, 2, 800, 900]), torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match=r"fallback \(torch.func vmap\) failed on GRU.*method='loop'"):
        task_gram(Recurrent(), x0, t, task, schedule=SCHEDULE, noise=torch.randn(x0.shape, generator=g))


def test_a_dict_output_with_a_sample_entry_is_unwrapped() -> None:
    class DictNet(Net):
        def forward(self, x, t):
            return {"sample": self.lin(x)}

    x0, t, task = _batch()
    noise = torch.randn(x0.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    a = DictNet().double()
    torch.manual_seed(0)
    b = Net().double()
    got = task_gram(a, x0, t, task, schedule=SCHEDULE, noise=noise)
    ref = task_gram(b, x0, t, task, schedule=SCHEDULE, noise=noise, method="loop")
    assert torch.allclose(got.gram, ref.gram, rtol=1e-10, atol=0)


def test_the_automatic_memory_budget_is_a_share_of_free_gpu_memory(monkeypatch) -> None:
    from gradconflict.engine import budget

    assert budget.chunk_budget("auto", torch.device("cpu")) is None  # no budget off the GPU
    assert budget.chunk_budget(None, torch.device("cuda")) is None
    assert budget.chunk_budget(123, torch.device("cuda")) == 123
    # 10 GiB free outside torch, 30 GiB cached by torch's allocator but unused: 40 GiB count as free
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * 2**30, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 50 * 2**30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 20 * 2**30)
    expected = int(40 * 2**30 * budget.AUTO_BUDGET_FRACTION) // 4
    assert budget.chunk_budget("auto", torch.device("cuda")) == expected
    with pytest.raises(ValueError, match="'auto' or None"):
        budget.chunk_budget("big", torch.device("cuda"))
