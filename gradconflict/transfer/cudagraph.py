"""A training step captured once as a CUDA graph and replayed: one launch per step instead of hundreds.

The batched fine-tuning step (``stacked.py``: vmap forward over the stacked copies, backward, per-copy clipping,
optimiser step) is a few hundred small kernels for the tiny models, so on a GPU its time is the CPU's launch
and dispatch overhead, not the GPU's work. ``torch.cuda.CUDAGraph`` records the kernels once and replays them
with one call. Replays compute exactly what the eager step computes (the same kernels on the same memory);
the inputs are copied into fixed buffers first, and the returned losses live in a fixed buffer that the next
replay overwrites.

Requirements (torch's "whole network capture"): a few eager steps on a side stream first (lazily created
optimiser state, cuDNN / cuBLAS workspaces), an optimiser made with ``capturable=True`` (AdamW keeps its step
count on the device), fixed shapes, no host synchronisation inside the step. If capture fails, the caller
goes on eagerly (``capture`` returns None after a warning). ``GRADCONFLICT_CUDA_GRAPHS=0`` switches graphs off.
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch

from .._env import env_choice
from ..engine.checks import first_line

__all__ = ["GRAPH_WARMUP", "cuda_graphs_enabled", "GraphedStep", "WarmupStream"]

GRAPH_WARMUP = 3  # eager steps before capture, as torch's documentation recommends

Step = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, dict], torch.Tensor]


def cuda_graphs_enabled(device: torch.device, steps: int) -> bool:
    """Whether a fine-tuning run of ``steps`` steps on ``device`` replays a captured graph: on CUDA, with at
    least one step left after the warm-up, unless the environment variable ``GRADCONFLICT_CUDA_GRAPHS`` is 0."""
    flag = env_choice("GRADCONFLICT_CUDA_GRAPHS", "1", ("0", "1", "false", "true", "off", "on"), allowed="0 or 1")
    return device.type == "cuda" and flag in ("1", "true", "on") and steps > GRAPH_WARMUP


class WarmupStream:
    """Context for an eager step before capture on ``device``: runs it on a side stream that waits for the
    current one, and makes the current stream wait for it afterwards (torch's recipe for warm-up before graph
    capture)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def __enter__(self) -> "WarmupStream":
        self._device = torch.cuda.device(self.device)
        self._device.__enter__()
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        self._ctx = torch.cuda.stream(self.stream)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._ctx.__exit__(*exc)
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        self._device.__exit__(*exc)


class GraphedStep:
    """``step(x0, t, noise, kw) -> losses`` captured on example inputs; calling it copies the inputs into the
    captured buffers, replays, and returns the losses buffer (overwritten by the next call). Capture, copies and
    replays run with the inputs' device as the current device (a model on ``cuda:1`` while ``cuda:0`` is current)."""

    def __init__(self, step: Step, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, kw: dict) -> None:
        self.device = x0.device
        self._inputs = (x0.clone(), t.clone(), noise.clone(), {k: v.clone() for k, v in kw.items()})
        self.graph = torch.cuda.CUDAGraph()
        self._failure: Optional[BaseException] = None

        def recorded(*args: object) -> torch.Tensor:  # keeps the step's own error: capture_end reports another
            try:
                return step(*args)
            except BaseException as err:
                self._failure = err
                raise

        with torch.cuda.device(self.device), torch.cuda.graph(self.graph, stream=torch.cuda.Stream(self.device)):
            self._out = recorded(*self._inputs)

    @classmethod
    def capture(cls, step: Step, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, kw: dict,
                reset: Callable[[], None]) -> Optional["GraphedStep"]:
        """The captured step, or None (with a warning) when this model or optimiser cannot be captured;
        ``reset`` runs before capture and after a failed one (e.g. ``optimizer.zero_grad(set_to_none=True)``,
        so the backward inside the graph allocates its gradients in the graph's memory). A failed capture
        leaves the current stream as it found it (torch's graph context may not restore it when capture ends
        with an error)."""
        device = x0.device
        reset()
        torch.cuda.synchronize(device)
        previous = torch.cuda.current_stream(device)
        graphed = cls.__new__(cls)
        try:
            cls.__init__(graphed, step, x0, t, noise, kw)
            return graphed
        except Exception as err:  # noqa: BLE001 - any capture failure means: go on eagerly
            torch.cuda.set_stream(previous)
            torch.cuda.synchronize(device)
            reset()
            cause = getattr(graphed, "_failure", None) or err
            warnings.warn(f"the fine-tuning step could not be captured as a CUDA graph ({first_line(cause)[:200]}); "
                          "going on "
                          "without graphs (set GRADCONFLICT_CUDA_GRAPHS=0 to skip the attempt)", RuntimeWarning,
                          stacklevel=2)
            return None

    def __call__(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, kw: dict) -> torch.Tensor:
        sx0, st, snoise, skw = self._inputs
        with torch.cuda.device(self.device):
            sx0.copy_(x0)
            st.copy_(t)
            snoise.copy_(noise)
            for k, v in skw.items():
                v.copy_(kw[k])
            self.graph.replay()
        return self._out
