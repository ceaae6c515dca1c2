"""Arithmetic precision of the fused engine (``engine/precision.py``) against float64 references.

* Under autocast, a Linear or Conv layer's per-task gradients are built from the operands autocast used: the
  input cast to bfloat16 as the forward cast it, the half-precision output gradient, float32 accumulation.
  Reference: the same captured operands multiplied in float64.
* ``gram_precision="bf16"`` folds ``bf16(J) bf16(J)^T`` with float32 accumulation. Reference: the per-task
  gradients returned by the engine, rounded to bfloat16 and multiplied in float64.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import gradconflict as gc
from gradconflict.engine import precision, task_gram

from zoo import DiTBlocks

SCHEDULE = gc.NoiseSchedule.linear(T=1000)


class NormLinear(nn.Module):
    """LayerNorm (float32 under autocast) feeding a Linear (bfloat16 under autocast)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(6)
        self.layer = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.layer(self.norm(x))


class NormConv(nn.Module):
    """GroupNorm (float32 under autocast) feeding a Conv2d (bfloat16 under autocast)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(2, 4)
        self.layer = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.layer(self.norm(x))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def _capture(layer: nn.Module) -> tuple[dict, object]:
    """Record the layer's input (as the module received it) and its output gradient (as autograd delivers it)."""
    seen: dict = {}

    def hook(module, args, output):
        seen["input"] = args[0].detach().clone()
        output.register_hook(lambda g: seen.__setitem__("grad", g.detach().clone()))

    return seen, layer.register_forward_hook(hook)


def _weight_columns(model: nn.Module, name: str) -> slice:
    start = 0
    for n, p in model.named_parameters():
        if n == name:
            return slice(start, start + p.numel())
        start += p.numel()
    raise KeyError(name)


def _per_task_reference(kind: str, layer: nn.Module, a: torch.Tensor, b: torch.Tensor, task: torch.Tensor, K: int,
                        counts: torch.Tensor) -> torch.Tensor:
    """float64 ``dW_k = sum_{i in k} B_i^T A_i`` (Linear) or the conv weight gradient summed over task k."""
    a, b = a.double(), b.double()
    out = torch.zeros(K, layer.weight.numel(), dtype=torch.float64)
    for i in range(a.shape[0]):
        if kind == "linear":
            dw = b[i].reshape(-1, b.shape[-1]).T @ a[i].reshape(-1, a.shape[-1])
        else:
            dw = torch.nn.grad.conv2d_weight(a[i : i + 1], layer.weight.shape, b[i : i + 1], padding=1)
        out[task[i]] += dw.reshape(-1)
    return out


def _autocast_problem(kind: str, device: str):
    """A norm layer (float32 under autocast) feeding a Linear or Conv2d (3x3, or 1x1 for "pointwise"; bfloat16
    under autocast): 8 samples, K = 4."""
    torch.manual_seed(0)
    model = NormLinear() if kind == "linear" else NormConv()
    if kind == "pointwise":  # a 1x1 conv: on the CPU built from per-sample products (rules._pointwise_weight)
        model.layer = nn.Conv2d(4, 4, 1)
    model = model.to(device)
    N, K = 8, 4
    x0 = (torch.randn(N, 3, 6) if kind == "linear" else torch.randn(N, 4, 5, 5)).to(device)
    t = torch.tensor([5, 30, 200, 260, 500, 520, 800, 990], device=device)
    return model, x0, t, torch.arange(N) // 2, K


# on a GPU machine the CUDA paths run too: bf16 x bf16 -> float32 matmuls (out_dtype) and exact TF32 convolutions
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_autocast_layers_are_built_from_the_operands_autocast_used(kind: str, device: str) -> None:
    model, x0, t, task, K = _autocast_problem(kind, device)
    seen, handle = _capture(model.layer)
    try:
        got = task_gram(model, x0, t, task, schedule=SCHEDULE, K=K, noise=torch.randn_like(x0), check=True,
                        autocast_dtype=torch.bfloat16, return_gradients=True)
    finally:
        handle.remove()
    assert seen["grad"].dtype == torch.bfloat16 and seen["input"].dtype == torch.float32  # the case under test
    seen = {k: v.cpu() for k, v in seen.items()}
    J = got.gradients[:, _weight_columns(model, "layer.weight")]
    counts = torch.bincount(task, minlength=K)
    as_run = _per_task_reference(kind, model.layer.cpu(), seen["input"].to(torch.bfloat16), seen["grad"], task, K,
                                 counts)
    assert _rel(J, as_run) <= 1e-5  # float32 accumulation of exact products
    uncast = _per_task_reference(kind, model.layer, seen["input"], seen["grad"], task, K, counts)
    assert _rel(uncast, as_run) > 1e-4  # the cast matters: building from the float32 input would fail above


def _dit_batch(K: int = 4, n: int = 2, device: str = "cpu"):
    torch.manual_seed(0)
    model = DiTBlocks().to(device)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(K * n, 1, 8, 8, generator=g).to(device)
    t = torch.randint(0, 1000, (K * n,), generator=g).to(device)
    task = torch.arange(K * n) % K
    return model, x0, t, task, dict(schedule=SCHEDULE, K=K, noise=torch.randn(x0.shape, generator=g).to(device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("columns", [precision.FOLD_COLUMNS, 7])
def test_bf16_fold_equals_the_rounded_gradients_gram(columns: int, device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "FOLD_COLUMNS", columns)  # 7: every layer folded in many float64-summed pieces
    model, x0, t, task, args = _dit_batch(device=device)
    got = task_gram(model, x0, t, task, gram_precision="bf16", return_gradients=True, check=True, **args)
    Jb = got.gradients.to(torch.bfloat16).double()
    assert _rel(got.gram, Jb @ Jb.T) <= 1e-5
    exact = task_gram(model.double(), x0.double(), t, task, method="loop", **{**args, "noise": args["noise"].double()})
    err = _rel(got.gram, exact.gram)
    assert 1e-6 < err <= 1e-2  # really reduced precision, and within the documented size (about 1e-3)


def test_tf32_fold_is_fp32_on_the_cpu() -> None:
    model, x0, t, task, args = _dit_batch()
    fp32 = task_gram(model, x0, t, task, **args)
    tf32 = task_gram(model, x0, t, task, gram_precision="tf32", **args)
    assert torch.equal(fp32.gram, tf32.gram)  # the CPU has no TF32: documented as no effect


def test_gram_precision_errors_name_the_choices() -> None:
    model, x0, t, task, args = _dit_batch()
    with pytest.raises(ValueError, match="unknown gram_precision 'fp16'.*'fp32', 'tf32', 'bf16'"):
        task_gram(model, x0, t, task, gram_precision="fp16", **args)
    with pytest.raises(ValueError, match="applies to method='fused'"):
        task_gram(model, x0, t, task, method="loop", gram_precision="bf16", **args)


def test_task_gram_respects_and_restores_the_new_tf32_settings() -> None:
    """A user who chose TF32 with torch's fp32_precision settings (2.9+) can call task_gram (the legacy allow_tf32
    switches raise once the new ones are set), and finds the settings as they were afterwards."""
    matmul, conv = torch.backends.cuda.matmul, getattr(torch.backends.cudnn, "conv", None)
    if not (hasattr(matmul, "fp32_precision") and hasattr(conv, "fp32_precision")):
        pytest.skip("this torch has only the legacy TF32 switches")
    old = matmul.fp32_precision, conv.fp32_precision
    model, x0, t, task, args = _dit_batch()
    try:
        matmul.fp32_precision = conv.fp32_precision = "tf32"
        seen = []
        hook = model.out.register_forward_hook(lambda *a: seen.append(matmul.fp32_precision))
        task_gram(model, x0, t, task, **args)
        hook.remove()
        assert seen and set(seen) == {"ieee"}  # inside (the fused pass and the self-check's own): full float32
        assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")  # restored
    finally:
        matmul.fp32_precision, conv.fp32_precision = old


def test_a_model_that_reads_the_legacy_cudnn_flags_still_runs() -> None:
    """Code inside the model may use torch.backends.cudnn.flags (legacy TF32 switches): task_gram must not have
    switched to the newer fp32_precision settings, which make those legacy reads raise."""

    class Legacy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            with torch.backends.cudnn.flags(enabled=True):
                return self.lin(x)

    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(8, 4, generator=g)
    res = task_gram(Legacy(), x0, torch.randint(0, 1000, (8,), generator=g), torch.arange(8) % 2, K=2,
                    schedule=SCHEDULE)
    assert res.gram.shape == (2, 2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["linear", "conv", "pointwise"])
def test_bf16_fold_under_autocast_builds_bf16_gradients_directly(kind: str, device: str, monkeypatch) -> None:
    """With the bf16 fold, autocast's bf16 layers produce J in bfloat16 straight from the product (no float32 J):
    the Gram equals the float64 Gram of the bf16-rounded float32 per-task gradients (the same float32 sums, each
    rounded once; a bias summed per sample and then per task in bfloat16 would be rounded twice: 3e-4 here)."""
    from gradconflict.engine import rules

    model, x0, t, task, K = _autocast_problem(kind, device)
    args = dict(schedule=SCHEDULE, K=K, noise=torch.randn_like(x0), check=True, autocast_dtype=torch.bfloat16)
    full = task_gram(model, x0, t, task, return_gradients=True, **args)  # float32 J (checked above against float64)
    Jb = full.gradients.to(torch.bfloat16).double()
    calls = []
    original = rules.half_bmm
    monkeypatch.setattr(rules, "half_bmm", lambda a, b: calls.append(a.dtype) or original(a, b))
    got = task_gram(model, x0, t, task, gram_precision="bf16", **args)
    assert not calls  # the float32-output product was not used
    assert _rel(got.gram, Jb @ Jb.T) <= 1e-6
    assert _rel(got.gram, full.gram) > 1e-4  # really rounded to bfloat16


@pytest.mark.parametrize("K", [5, 300])
def test_symmetric_product_computes_the_lower_blocks_only_and_is_exact_to_float32(K: int) -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(K, 700, generator=g)
    calls = []

    def product(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls.append((x.shape[0], y.shape[0]))
        return x @ y.T

    got = precision.symmetric_product(a, product)
    ref = a.double() @ a.double().T
    assert _rel(got.double(), ref) <= 1e-6
    if K >= precision.SYMMETRIC_MIN_K:  # the blocks above the diagonal are the ones below, transposed
        k = K // precision.SYMMETRIC_BLOCKS
        assert torch.equal(got[:k, k:], got[k:, :k].T)
    b = precision.SYMMETRIC_BLOCKS if K >= precision.SYMMETRIC_MIN_K else 1
    assert len(calls) == b * (b + 1) // 2
    assert sum(m * n for m, n in calls) <= (0.7 if b > 1 else 1.0) * K * K  # (b + 1) / (2 b) of the products


def test_symmetric_product_refuses_an_unknown_precision() -> None:
    with pytest.raises(ValueError, match="precision must be one of fp32, tf32, bf16, got 'auto'"):
        precision.symmetric_product(torch.ones(3, 2), lambda x, y: x @ y.T, "auto")


@pytest.mark.parametrize("gram_precision", ["fp32", "tf32", "bf16"])
def test_blocked_fold_in_the_engine_equals_the_float64_loop(gram_precision: str, monkeypatch) -> None:
    monkeypatch.setattr(precision, "SYMMETRIC_MIN_K", 2)  # every fold of this K = 4 problem goes through blocks
    model, x0, t, task, args = _dit_batch()
    got = task_gram(model, x0, t, task, gram_precision=gram_precision, check=True, **args)
    exact = task_gram(model.double(), x0.double(), t, task, method="loop", **{**args, "noise": args["noise"].double()})
    assert _rel(got.gram, exact.gram) <= (1e-5 if gram_precision != "bf16" else 1e-2)


def test_auto_fold_precision_is_tf32_only_for_float32_models_on_a_gpu() -> None:
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert precision.resolve_gram_precision("auto", cuda, torch.float32) == "tf32"
    assert precision.resolve_gram_precision("auto", cuda, torch.bfloat16) == "tf32"
    assert precision.resolve_gram_precision("auto", cuda, torch.float64) == "fp32"  # float64 stays exact
    assert precision.resolve_gram_precision("auto", cpu, torch.float32) == "fp32"
    assert precision.resolve_gram_precision("bf16", cpu, torch.float32) == "bf16"  # an explicit choice is kept
    with pytest.raises(ValueError, match="'auto', 'fp32', 'tf32', 'bf16'"):
        precision.resolve_gram_precision("fp8", cuda, torch.float32)
    # on the CPU the default is the float32 fold, bit for bit, and the loop accepts the default
    model, x0, t, task, args = _dit_batch()
    assert torch.equal(task_gram(model, x0, t, task, **args).gram,
                       task_gram(model, x0, t, task, gram_precision="fp32", **args).gram)
    task_gram(model, x0, t, task, method="loop", **args)


def test_half_product_switch_is_read_from_the_environment(monkeypatch) -> None:
    monkeypatch.delenv("GRADCONFLICT_HALF_PRODUCT", raising=False)
    assert precision.half_product_mode() == "out_dtype"
    monkeypatch.setenv("GRADCONFLICT_HALF_PRODUCT", "tf32")
    assert precision.half_product_mode() == "tf32"
    a = torch.randn(2, 3, 4).to(torch.bfloat16)
    ref = torch.bmm(a.double(), a.transpose(1, 2).double())
    assert _rel(precision.half_bmm(a, a.transpose(1, 2)).double(), ref) <= 1e-6  # exact products, float32 sums
    monkeypatch.setenv("GRADCONFLICT_HALF_PRODUCT", "fast")
    with pytest.raises(ValueError, match="GRADCONFLICT_HALF_PRODUCT must be"):
        precision.half_product_mode()
