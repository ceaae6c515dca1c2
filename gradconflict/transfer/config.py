"""Configuration of a cross-bin transfer experiment (a plain dataclass, validated on construction)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

__all__ = ["TransferConfig", "MODES", "OPTIMIZERS"]

MODES: tuple[str, ...] = ("finetune", "lookahead")
OPTIMIZERS: tuple[str, ...] = ("adamw", "sgd")


@dataclass
class TransferConfig:
    """How each copy of the model is fine-tuned and how the losses are measured.

    * ``mode``: "finetune" (``steps`` optimiser steps per copy) or "lookahead" (one plain SGD step of size
      ``lr``, TAG-style; ``steps`` must then be None or 1, ``weight_decay`` 0 and ``grad_clip`` None).
    * ``steps``: optimiser steps per copy; ``lr``: learning rate (parameter units per step for SGD, the
      AdamW step size otherwise); ``optimizer``: "adamw" (torch.optim.AdamW, decoupled weight decay) or
      "sgd" (plain, no momentum); ``betas``/``eps``: AdamW's; ``weight_decay``: per step, decoupled;
      ``grad_clip``: per-copy global-norm clip (None = off).
    * ``batch_size``: samples per copy per step; ``eval_samples``: samples per target bin in each seed's
      fixed evaluation set; ``eval_chunk``: samples per forward pass when evaluating.
    * ``seeds``: an int R (seeds ``seed, seed + 1, ..., seed + R - 1``) or explicit seeds; every seed redraws
      the fine-tuning batches and the evaluation sets.
    * ``include_all``: also fine-tune an "all bins" control copy on every binned timestep.
    * ``batched``: fine-tune all copies as one vmapped computation (else one after the other).
    * ``first_order``: also compute the first-order prediction ``lr <g_i, grad L_j> / L_j`` (always on in
      lookahead mode); ``gram_method``: the ``task_gram`` method used for it.
    * ``loss_space`` / ``weighting``: the loss the copies are fine-tuned in, restricted to the copy's bin:
      ``w(SNR_t) * ||y - y_hat||^2`` with y in ``loss_space`` units ("x0", "eps" or "v") and ``w`` the
      ``weighting.by_name`` spec's weight in those units (None: 1). The default (x0, None) is the paper's plain
      x0 loss; pass the model's prediction and training weighting to fine-tune in the loss it was trained with.
      The evaluated losses stay in x0 units. The first-order prediction assumes the x0 loss (refused otherwise).
    """

    steps: Optional[int] = None
    lr: float = 1e-4
    optimizer: str = "adamw"
    eval_samples: int = 64
    seeds: Union[int, Sequence[int]] = 1
    seed: int = 0
    batch_size: int = 16
    weight_decay: float = 0.0
    grad_clip: Optional[float] = None
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    include_all: bool = True
    mode: str = "finetune"
    batched: bool = True
    first_order: bool = False
    gram_method: str = "fused"
    eval_chunk: int = 512
    progress: bool = True
    loss_space: str = "x0"
    weighting: Optional[str] = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; use one of {list(MODES)}")
        if self.mode == "lookahead":
            if self.steps not in (None, 1):
                raise ValueError(f"mode='lookahead' takes exactly one SGD step, got steps={self.steps}; pass steps=None or 1")
            if self.weight_decay != 0.0 or self.grad_clip is not None:
                raise ValueError("mode='lookahead' is one plain SGD step: use weight_decay=0 and grad_clip=None")
            self.steps, self.optimizer, self.first_order = 1, "sgd", True
        if self.steps is None:
            raise ValueError("steps is required in mode='finetune' (the number of optimiser steps per copy)")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be a positive integer number of optimiser steps, got {self.steps!r}; use steps >= 1")
        if not (self.lr > 0):
            raise ValueError(f"lr must be > 0, got {self.lr!r}; a zero or negative step would not fine-tune anything")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; use one of {list(OPTIMIZERS)}")
        for name in ("eval_samples", "batch_size", "eval_chunk"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}; use {name} >= 1")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.grad_clip is not None and not (self.grad_clip > 0):
            raise ValueError(f"grad_clip must be > 0 or None (off), got {self.grad_clip}")
        if not all(0.0 <= b < 1.0 for b in self.betas) or self.eps <= 0:
            raise ValueError(f"AdamW needs betas in [0, 1) and eps > 0, got betas={self.betas}, eps={self.eps}")
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        self.seed_list()  # validate
        from ..targets import normalize_prediction
        from ..weighting import by_name

        self.loss_space = normalize_prediction(self.loss_space, "loss_space")
        if self.weighting is not None:
            by_name(self.weighting)  # an unknown spec fails here, naming the known ones
        if self.first_order and (self.loss_space != "x0" or self.weighting is not None):
            raise ValueError("the first-order prediction lr G_ij / L_j assumes fine-tuning in the plain x0 loss; use "
                             "loss_space='x0' and weighting=None with first_order=True or mode='lookahead'")

    def seed_list(self) -> list[int]:
        """The seeds as a list: ``seeds`` = R gives ``[seed, ..., seed + R - 1]``."""
        if isinstance(self.seeds, bool):
            raise ValueError(f"seeds must be a count or a list of ints, got {self.seeds!r}")
        if isinstance(self.seeds, int):
            if self.seeds < 1:
                raise ValueError(f"seeds must be >= 1 (the number of repetitions), got {self.seeds}")
            return [int(self.seed) + r for r in range(self.seeds)]
        seeds = [int(s) for s in self.seeds]
        if not seeds or len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds must be a non-empty list of distinct ints, got {list(self.seeds)}")
        return seeds

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        out = dataclasses.asdict(self)
        out["seeds"] = self.seeds if isinstance(self.seeds, int) else list(self.seeds)
        out["betas"] = list(self.betas)
        return out
