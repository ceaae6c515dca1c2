"""``task_gram(..., task_chunks=m)``: one fused pass per pair of task groups gives the Gram of one pass over the
whole batch, each pass seeing only two groups' samples (``engine/chunked.py``)."""

from __future__ import annotations

import pytest
import torch

import gradconflict as gc
from gradconflict.engine import task_gram
from gradconflict.engine.chunked import task_groups

from zoo import DiTBlocks, UNetLike

SCHEDULE = gc.NoiseSchedule.linear()


def _problem(model_cls, K: int = 5, sizes=(3, 1, 2, 3, 2), classes: bool = False):
    """Tasks of unequal sizes (sample counts ``sizes``), samples interleaved; optional class labels."""
    torch.manual_seed(0)
    model = (model_cls(num_classes=3) if classes else model_cls()).double()
    g = torch.Generator().manual_seed(0)
    task = torch.cat([torch.full((n,), k) for k, n in enumerate(sizes)])[torch.randperm(sum(sizes), generator=g)]
    t = torch.randint(0, 1000, (len(task),), generator=g)
    x0 = torch.randn(len(task), 1, 8, 8, generator=g, dtype=torch.float64)
    kwargs = {"y": torch.randint(0, 3, (len(task),), generator=g)} if classes else {}
    args = dict(schedule=SCHEDULE, K=K, noise=torch.randn(x0.shape, generator=g, dtype=torch.float64),
                model_kwargs=kwargs)
    return model, x0, t, task, args


@pytest.mark.parametrize("classes", [False, True])
@pytest.mark.parametrize("model_cls", [DiTBlocks, UNetLike])
@pytest.mark.parametrize("chunks", [2, 3, 5])
def test_pair_passes_equal_the_float64_loop(model_cls, chunks: int, classes: bool) -> None:
    model, x0, t, task, args = _problem(model_cls, classes=classes)
    ref = task_gram(model, x0, t, task, method="loop", **args)
    got = task_gram(model, x0, t, task, task_chunks=chunks, **args)
    assert float((got.gram - ref.gram).norm() / ref.gram.norm()) <= 1e-12
    torch.testing.assert_close(got.losses, ref.losses, rtol=1e-12, atol=0)
    assert torch.equal(got.gram, got.gram.T)
    assert got.counts.tolist() == [3, 1, 2, 3, 2]


def test_each_pass_sees_only_two_groups_and_every_pair_is_run() -> None:
    model, x0, t, task, args = _problem(DiTBlocks, K=6, sizes=(2, 2, 2, 2, 2, 2))
    batches: list[int] = []
    handle = model.register_forward_pre_hook(lambda m, a: batches.append(a[0].shape[0]))
    try:
        task_gram(model, x0, t, task, task_chunks=3, check=False, **args)
    finally:
        handle.remove()
    assert batches == [8, 8, 8]  # 3 pairs of 2 groups of 2 tasks x 2 samples, never the whole batch of 12
    groups = task_groups(torch.full((6,), 2), 3)
    assert [g.tolist() for g in groups] == [[0, 3], [1, 4], [2, 5]]
    # balanced by samples, not by task count: loads 6, 5, 5 for tasks of 5, 1, 1, 1, 4, 4 samples
    groups = task_groups(torch.tensor([5, 1, 1, 1, 4, 4]), 3)
    assert sorted(sum(int(c) for c in torch.tensor([5, 1, 1, 1, 4, 4])[g]) for g in groups) == [5, 5, 6]
    assert sorted(k for g in groups for k in g.tolist()) == list(range(6))


@pytest.mark.parametrize("chunks", [0, 6, 1.5, True, "2"])
def test_task_chunks_outside_one_to_K_is_refused(chunks) -> None:
    model, x0, t, task, args = _problem(DiTBlocks)
    with pytest.raises(ValueError, match="task_chunks must be an integer between 1"):
        task_gram(model, x0, t, task, task_chunks=chunks, **args)


@pytest.mark.parametrize("extra", [{"return_gradients": True}, {"sketch_dim": 8}, {"train_mode": True}])
def test_task_chunks_refuse_what_they_cannot_return(extra: dict) -> None:
    model, x0, t, task, args = _problem(DiTBlocks)
    with pytest.raises(ValueError, match="task_chunks > 1 works only in one process, in eval mode, for the Gram alone"):
        task_gram(model, x0, t, task, task_chunks=2, **extra, **args)
    with pytest.raises(ValueError, match="task_chunks applies to method='fused'"):
        task_gram(model, x0, t, task, task_chunks=2, method="loop", **args)
    with pytest.raises(ValueError, match="task_chunks must be an integer"):
        task_gram(model, x0, t, task, task_chunks=0, method="loop", **args)


@pytest.mark.parametrize("chunks", [3, 5])
def test_the_self_check_on_every_pass_passes_on_a_correct_model(chunks: int) -> None:
    """check=True checks each pass against that pass's own full gradient (none left over from the last pass)."""
    model, x0, t, task, args = _problem(UNetLike)
    ref = task_gram(model, x0, t, task, method="loop", **args)
    got = task_gram(model, x0, t, task, task_chunks=chunks, check=True, **args)
    assert float((got.gram - ref.gram).norm() / ref.gram.norm()) <= 1e-12


def test_errors_name_the_callers_task_ids() -> None:
    class Fragile(DiTBlocks):
        def forward(self, x, t, y=None):
            out = super().forward(x, t, y)
            bad = torch.zeros_like(out).masked_fill((t == 777)[:, None, None, None].expand_as(out), float("nan"))
            return out + bad  # NaN for those samples only (a constant: no NaN reaches the others' gradients)

    model, x0, t, task, args = _problem(DiTBlocks)
    model = Fragile().double()
    t = t.clone()
    t[task == 4] = 777  # task 4's samples give NaN
    for chunks in (1, 3):
        with pytest.raises(ValueError, match=r"task\(s\) \[4\]"):
            task_gram(model, x0, t, task, task_chunks=chunks, **args)
