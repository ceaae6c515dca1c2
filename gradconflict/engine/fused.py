"""The fused engine: one forward and one backward over the whole batch give every task's gradient Gram.

Hooks on each layer capture its input in the forward pass and its output gradient in the backward pass.
The layer's K per-task gradients are built at once (``rules.py``, or ``fallback.py`` for unknown layers),
folded into the Gram ``G += J J^T`` (J: K x layer size; G accumulated in float64) and freed, so the extra
memory is about K times the largest layer. A parameter used several times (tied weights, a module called
twice) is folded after its last use, once its per-task gradient is complete.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn as nn

from .checks import first_line
from .fallback import fallback_grads, tensor_leaves
from .grouping import TaskIndex
from .precision import HALF_DTYPES, check_gram_precision, full_precision_reduction, layer_gram, tf32
from .rules import FORWARD_EXTRAS, HALF_INPUT_RULES, ROW_CHUNKED, rule_for, saved_half_input
from .workspace import Workspace, swap_workspace

__all__ = ["FusedGram", "OPAQUE_MODULES"]

# modules that use child modules' parameters without calling them (MultiheadAttention calls
# F.multi_head_attention_forward with out_proj.weight): treated as one unit by the fallback
OPAQUE_MODULES: tuple[type, ...] = (nn.MultiheadAttention,)


@dataclass
class _Call:
    module: nn.Module
    names: list[str]  # parameter names relative to module
    params: list[nn.Parameter]
    args: tuple
    kwargs: dict
    grads: list = field(default_factory=list)
    extra: dict = field(default_factory=dict)  # keyword arguments for the rule read off the forward (FORWARD_EXTRAS)
    amp: Optional[tuple] = None  # (device type, dtype) of the autocast the forward ran under, replayed by the fallback


class FusedGram:
    """Accumulates the K x K task Gram of a model's trainable parameters during one backward pass."""

    def __init__(self, model: nn.Module, idx: TaskIndex, *, compute_dtype: Optional[torch.dtype] = None,
                 keep_gradients: bool = False, sketch: Optional["Any"] = None,
                 reduce: Optional[Any] = None, max_chunk_elements: Optional[int] = None,
                 gram_precision: str = "fp32") -> None:
        self.model = model
        self.idx = idx
        self.compute_dtype = compute_dtype
        self.keep_gradients = keep_gradients
        self.sketch = sketch
        self.max_chunk_elements = max_chunk_elements  # memory budget: K x rows x row size per piece
        self.gram_precision = check_gram_precision(gram_precision)  # fold precision (precision.py)
        self.reduce = reduce  # e.g. a sum over torch.distributed ranks, applied to each layer's J before folding
        self.gram = torch.zeros(idx.K, idx.K, dtype=torch.float64)  # the result, set by finish()
        self._acc: Optional[torch.Tensor] = None  # running float64 sum of the layer Grams, on the gradients' device
        self._bad_rows: list[tuple[str, torch.Tensor]] = []
        self.gradients: dict[nn.Parameter, torch.Tensor] = {}
        self.nonfinite: dict[str, list[int]] = {}
        self.folded: set[int] = set()
        self._uses: dict[int, int] = {}  # uses still to be seen in the backward pass
        self._total_uses: dict[int, int] = {}  # uses in the forward pass
        self._buffers: dict[int, torch.Tensor] = {}
        self._param_name = {id(p): n for n, p in model.named_parameters()}
        self._deferred: list[_Call] = []
        self.outputs: list[torch.Tensor] = []  # every hooked layer output (the targets of a parameter-free backward)
        self._versions: list[int] = []  # each output's version counter when the hook saw it
        self._handles: list[Any] = []
        self._active = False
        self._workspace = Workspace()  # CPU scratch memory reused across layers (workspace.py)
        self._plan = self._make_plan()

    # ------------------------------------------------------------------ planning
    def _make_plan(self) -> dict[nn.Module, tuple[str, list[str], Any]]:
        """Per module with trainable parameters: ("rule" | "fallback", parameter names, the rule or None)."""
        plan: dict[nn.Module, tuple[str, list[str], Any]] = {}
        skip: set[int] = set()
        for _, m in self.model.named_modules():
            if id(m) in skip:
                continue
            if isinstance(m, OPAQUE_MODULES):
                names = [n for n, p in m.named_parameters() if p.requires_grad]
                for c in m.modules():
                    skip.add(id(c))
                if names:
                    plan[m] = ("fallback", names, None)
                continue
            names = [n for n, p in m.named_parameters(recurse=False) if p.requires_grad]
            if not names:
                continue
            rule = rule_for(m)
            plan[m] = ("rule" if rule is not None else "fallback", names, rule)
        return plan

    def __enter__(self) -> "FusedGram":
        for m in self._plan:
            self._handles.append(m.register_forward_hook(self._forward_hook, with_kwargs=True))
        self._active = True
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._active = False
        self._workspace.clear()

    # ------------------------------------------------------------------ hooks
    def _forward_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if not self._active or not torch.is_grad_enabled():
            return
        kind, names, _ = self._plan[module]
        try:
            params = [module.get_parameter(n) for n in names]
        except AttributeError as exc:  # a plain tensor stands in for a parameter during this forward
            raise ValueError(
                f"a {type(module).__name__} ran with a tensor in place of its parameters {names} ({first_line(exc)}; "
                "torch.func.functional_call?): the fused engine splits the gradients of the model's own parameters "
                "by task, use method='loop'"
            ) from exc
        for p in params:
            self._uses[id(p)] = self._uses.get(id(p), 0) + 1
            self._total_uses[id(p)] = self._total_uses.get(id(p), 0) + 1
        call = _Call(module, names, params, tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args), kwargs)
        if kind == "rule" and isinstance(output, torch.Tensor) and output.requires_grad:
            if output.dtype in HALF_DTYPES and self._plan[module][2] in HALF_INPUT_RULES and call.args:
                # autocast ran this layer in half precision: keep the input as the forward cast it (the operand the
                # rule uses, precision.py) rather than the float32 tensor, which autograd does not keep alive; the
                # very copy autograd saved when there is one (no second half-precision copy of the input)
                x = call.args[0]
                if x.dtype != output.dtype:
                    saved = saved_half_input(x, output)
                    x = saved if saved is not None else x.to(output.dtype)
                call.args = (x, *call.args[1:])
            extra = FORWARD_EXTRAS.get(self._plan[module][2]) if FORWARD_EXTRAS else None
            if extra is not None:
                call.extra = extra(module, call.args, output)
            output.register_hook(lambda g, c=call: self._on_rule_grad(c, g))
            self.outputs.append(output)
            self._versions.append(output._version)
            return
        outs = tensor_leaves(output)  # tensors inside tuples, dicts, diffusers outputs, dataclasses
        call.grads = [None] * len(outs)
        for i, o in enumerate(outs):
            if o.requires_grad:
                o.register_hook(lambda g, c=call, i=i: self._store_grad(c, i, g))
                self.outputs.append(o)
                self._versions.append(o._version)
        device = outs[0].device.type if outs else "cpu"
        if torch.is_autocast_enabled(device):
            call.amp = (device, torch.get_autocast_dtype(device))
        self._deferred.append(call)

    def _check_batched(self, module: nn.Module, args: tuple) -> None:
        """A layer with a rule splits its gradient along dim 0 of its input: refuse an input without the batch there
        (a position table looked up once and broadcast to every sample: its output gradient is already summed over
        the samples, and no rule can split it). Checked when the layer's output gradient arrives: a layer whose
        output never reaches the loss is no concern."""
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        n = self.idx.N
        if x is None or (x.ndim > 0 and x.shape[0] == n):
            return
        if x.ndim > 0 and x.shape[0] > n and x.shape[0] % n == 0:
            why = ("the batch is not dim 0 there (e.g. tokens flattened to (N * L, E), or the batch doubled): keep "
                   "the batch in dim 0, e.g. apply the layer to the (N, L, E) tensor")
        else:
            why = ("its output is not one row per sample (a slice of the batch, or a lookup shared by every sample), "
                   "so its gradient cannot be split by task: give it one row per sample (e.g. a position lookup as "
                   "emb(torch.arange(S).expand(N, S)))")
        raise ValueError(f"a {type(module).__name__} ran on an input of shape {tuple(x.shape)}, not on the batch of "
                         f"{n} samples in dim 0: {why}; or use method='loop'")

    def outputs_modified(self) -> bool:
        """Whether a hooked output was modified in place after its layer ran (``out += x``, ``relu_``).  A backward
        *to* the outputs (``torch.autograd.grad(total, outputs)``) would then stop at the modified version and hand
        the hooks the wrong gradient; a full ``backward()`` gives them the gradient of the value the layer made."""
        return any(o._version != v for o, v in zip(self.outputs, self._versions))

    def release_outputs(self) -> None:
        """Drop the references to the layer outputs once the backward pass is done (they hold activations)."""
        self.outputs.clear()
        self._versions.clear()

    def _store_grad(self, call: _Call, i: int, grad: torch.Tensor) -> None:
        call.grads[i] = grad.detach()

    def _dtype_for(self, t: torch.Tensor) -> torch.dtype:
        if self.compute_dtype is not None:
            return self.compute_dtype
        return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype

    def _on_rule_grad(self, call: _Call, grad: torch.Tensor) -> None:
        self._check_batched(call.module, call.args)  # only a layer whose output reaches the loss needs splitting
        rule = self._plan[call.module][2]
        dtype = self._dtype_for(call.params[0])
        rows = self._row_chunk(call, rule)
        if grad.dtype in HALF_DTYPES and rule in HALF_INPUT_RULES and call.args:
            # the layer ran in half precision (autocast): its input was kept as the forward cast it (_forward_hook);
            # products of half-valued operands are exact in TF32 (precision.py)
            if self._direct_bf16(grad):
                # the bf16 fold rounds J to bfloat16 anyway: let the product round its float32 accumulator to
                # bfloat16 itself (half the memory traffic of a float32 J, native tensor-core kernels)
                with full_precision_reduction():
                    self._apply_rule(call, rule, grad, torch.bfloat16, rows)
                return
            if grad.device.type == "cuda":
                with tf32(True):
                    self._apply_rule(call, rule, grad, dtype, rows)
                return
        if grad.device.type != "cpu":
            self._apply_rule(call, rule, grad, dtype, rows)
            return
        previous = swap_workspace(self._workspace)
        try:
            self._apply_rule(call, rule, grad, dtype, rows)
        finally:
            swap_workspace(previous)

    def _direct_bf16(self, grad: torch.Tensor) -> bool:
        """Whether a bfloat16 layer's per-task gradients are produced in bfloat16 directly: with the bf16 fold,
        when nothing else reads J at full precision (returned gradients, a sketch), no compute dtype is forced, and
        J is not summed over torchrun ranks first (a bf16 sum would round again)."""
        return (grad.dtype == torch.bfloat16 and self.gram_precision == "bf16" and self.compute_dtype is None
                and not self.keep_gradients and self.sketch is None and self.reduce is None)

    def _apply_rule(self, call: _Call, rule: Any, grad: torch.Tensor, dtype: torch.dtype, rows: Optional[int]) -> None:
        if rows is None:
            per_task = rule(call.module, call.args, grad.detach(), self.idx, dtype, **call.extra)
            call.args, call.extra = (), {}
            self._accumulate(call, per_task)
            return
        # memory budget: build and fold the per-task gradients of a few output rows at a time (the Gram is a sum
        # over parameter coordinates, so the pieces add up to the same result)
        n_rows = call.module.weight.shape[0]
        for start in range(0, n_rows, rows):
            piece = rule(call.module, call.args, grad.detach(), self.idx, dtype, rows=slice(start, start + rows),
                         **call.extra)
            for name, p in zip(call.names, call.params):
                if name in piece:
                    self._fold_piece(self._param_name.get(id(p), "?"), piece[name].reshape(self.idx.K, -1))
        call.args, call.extra = (), {}
        for p in call.params:
            self._uses[id(p)] -= 1
            self.folded.add(id(p))

    def _row_chunk(self, call: _Call, rule: Any) -> Optional[int]:
        """Rows per piece when a memory budget applies to this call, else None (one piece)."""
        if self.max_chunk_elements is None or rule not in ROW_CHUNKED or self.keep_gradients or self.sketch is not None:
            return None
        module = call.module
        if getattr(module, "groups", 1) != 1 or any(self._total_uses[id(p)] != 1 for p in call.params):
            return None  # grouped convs and shared parameters are built whole
        weight = module.weight
        per_row = self.idx.K * (weight.numel() // weight.shape[0])
        if per_row * weight.shape[0] <= self.max_chunk_elements:
            return None
        return max(1, self.max_chunk_elements // per_row)

    def finish(self) -> None:
        """Process deferred (fallback) layers and fold whatever is left; call after ``backward``."""
        self._active = False
        for call in self._deferred:
            if all(g is None for g in call.grads):
                self._accumulate(call, {})
                continue
            grads = tuple(call.grads)
            amp = torch.autocast(*call.amp) if call.amp else contextlib.nullcontext()
            with torch.no_grad(), amp:  # the module is re-run as in the forward pass (same autocast)
                try:
                    per_task = fallback_grads(call.module, call.names, call.args, call.kwargs, grads, self.idx,
                                              self._dtype_for(call.params[0]))
                except torch.cuda.OutOfMemoryError:
                    raise
                except (RuntimeError, NotImplementedError, ValueError) as exc:  # vmap's own errors are ValueErrors
                    raise ValueError(
                        f"the generic per-sample fallback (torch.func vmap) failed on {type(call.module).__name__} "
                        f"{self._param_name.get(id(call.params[0]), '?')!r} ({first_line(exc)}); the layer may not take "
                        "the batch in dim 0 (batch_first=False) or compute its weight from parameters without an input "
                        "(a parametrization such as weight_norm); use method='loop' for this model, or register a rule "
                        "for this layer with gradconflict.engine.register_rule"
                    ) from exc
            per_task = {k: v.detach() for k, v in per_task.items()}
            self._accumulate(call, per_task)
        self._deferred.clear()
        for pid in list(self._buffers):
            self._fold(pid)
        self._finish_gram()

    # ------------------------------------------------------------------ accumulation
    def _accumulate(self, call: _Call, per_task: dict[str, torch.Tensor]) -> None:
        for name, p in zip(call.names, call.params):
            pid = id(p)
            g = per_task.get(name)
            if g is not None:
                if pid in self._buffers:
                    self._buffers[pid] = self._buffers[pid] + g
                else:
                    self._buffers[pid] = g
            self._uses[pid] -= 1
            if self._uses[pid] == 0 and pid in self._buffers:
                self._fold(pid)

    def _fold(self, pid: int) -> None:
        J = self._buffers.pop(pid).reshape(self.idx.K, -1)
        J = self._fold_piece(self._param_name.get(pid, "?"), J)
        if self.keep_gradients:
            self.gradients[pid] = J.detach().to("cpu", torch.float64)
        self.folded.add(pid)

    def _fold_piece(self, name: str, J: torch.Tensor) -> torch.Tensor:
        """``G += J J^T`` in float64 for K x n per-task gradient coordinates of parameter ``name``.

        The sum stays on J's device (no host transfer or synchronisation inside the backward pass);
        ``finish`` symmetrises it and moves it to the CPU. A non-finite entry of J shows up in its row's
        diagonal; the rows are recorded on the device and reported by ``finish``."""
        if self.reduce is not None:
            J = self.reduce(J)
        # float64 models: float64 products; otherwise each layer's J J^T in float32 (TF32 off) or the reduced
        # precision asked for, summed over layers in float64
        piece = layer_gram(J, self.gram_precision)
        self._acc = piece if self._acc is None else self._acc.add_(piece)
        self._bad_rows.append((name, ~torch.isfinite(torch.diagonal(piece))))
        if self.sketch is not None:
            self.sketch.add(name, J)
        return J

    def _finish_gram(self) -> None:
        """``gram = (G + G^T) / 2`` on the CPU (exactly symmetric) and ``nonfinite``: parameter -> task rows."""
        if self._acc is not None:
            acc = self._acc.to("cpu")
            self.gram = (acc + acc.T) / 2
            self._acc = None
        if self._bad_rows:
            flags = torch.stack([bad.any() for _, bad in self._bad_rows]).cpu()  # one synchronisation
            for (name, bad), flagged in zip(self._bad_rows, flags.tolist()):
                if flagged:
                    rows = set(self.nonfinite.get(name, [])) | set(torch.nonzero(bad.cpu()).flatten().tolist())
                    self.nonfinite[name] = sorted(rows)
            self._bad_rows.clear()
