"""Configuration of a diffusion training run (a plain dataclass, saved as ``config.json``)."""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..adapters.conditioning import NULL_LENGTH
from ..targets import normalize_prediction

__all__ = ["TrainConfig", "RESUMABLE_FIELDS", "SCHEDULES", "USED_KEY", "is_builtin", "normalize_model"]

USED_KEY = "used"
"""The ``config.json`` entry (beside the config's fields) of what a run used: schedule, prediction, data and the
conditioning names passed to the model (see ``loop.train``)."""

SCHEDULES: tuple[str, ...] = ("linear", "cosine")


def _real(value: Any) -> bool:
    """True for a real number (int, float, numpy scalar), False for bools, strings and the like."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_builtin(model: str) -> bool:
    """True for a built-in model name (``gradconflict.models.MODEL_NAMES``), False for a user model spec."""
    from ..models import MODEL_NAMES

    return str(model).strip().lower() in MODEL_NAMES


def normalize_model(model: str) -> str:
    """A run's model as recorded: a built-in name as given; ``file.py:function`` and ``diffusers:PATH`` with
    absolute paths (the same file given relative or absolute is the same run); ``ValueError`` for anything else."""
    from ..models import MODEL_NAMES

    if not isinstance(model, str) or not model.strip():
        raise ValueError(f"model must be a name or a model spec string, got {model!r}")
    if is_builtin(model):
        return model
    if model.startswith("diffusers:"):
        return "diffusers:" + str(Path(model[len("diffusers:"):]).resolve())
    target, sep, func = model.rpartition(":")
    if not sep or not target or not func:
        raise ValueError(f"unknown model {model!r}: use a built-in name {list(MODEL_NAMES)}, "
                         "'path/file.py:function', 'module:function' or 'diffusers:PATH'")
    return f"{Path(target).resolve()}:{func}" if target.endswith(".py") else model


# fields that may differ between a run on disk and the config that resumes it
RESUMABLE_FIELDS: frozenset[str] = frozenset({"steps", "log_every", "checkpoint_every", "device", "cpu_threads",
                                              "keep_checkpoints"})

LATER_FIELDS: dict[str, Any] = {"null_conditioning": None, "null_length": NULL_LENGTH}
"""Fields added after runs were recorded, with their defaults: at its default such a field stays out of
``identity()``, so a run (or a cached ``reproduce``/``compare`` stage) recorded before the field existed still
matches and resumes instead of retraining."""


@dataclass
class TrainConfig:
    """One training run.

    * ``data``: dataset name or path (see ``gradconflict.data.load_dataset``); ``data_limit``: first N images;
      ``image_size``: pixels (height = width); ``scale``: value range of ``.npy``/``.npz`` data (auto, none,
      minmax; see ``gradconflict.data``).
    * ``model``: a name in ``gradconflict.models.MODEL_NAMES``; ``model_overrides``: config fields to change
      (``in_channels``/``image_size``/``prediction`` follow the data and ``prediction`` automatically);
      ``conditional``: give the model the dataset's class labels. Or a user model spec (``gradconflict.spec``):
      ``path/file.py:function`` / ``module:function`` (built with torch seeded by ``seed``; a file is recorded
      by its absolute path) or ``diffusers:PATH`` (a local diffusers folder, fine-tuned from its weights); its
      input must match the data (``image_size``, channels), and ``model_overrides`` do not apply. The run
      trains it with ``schedule``/``T``/``prediction``, whatever the build function returns besides the model.
    * per-sample conditioning (user model specs only): the data's conditioning arrays (``encoder_hidden_states``
      (N, L, D), ``encoder_attention_mask``, ... see ``gradconflict.adapters.conditioning``) go to the model by
      name with the rows of each batch's images; ``null_conditioning``: "zeros" or a ``.npy`` embedding (L, D)
      (recorded by its absolute path) gives every sample that ``encoder_hidden_states`` instead (an
      unconditional run of a text-conditioned model; ``null_length`` = L of the zeros).
    * ``weighting``: a ``weighting.by_name`` spec (e.g. "min_snr:5") or an adaptive one of
      ``gradconflict.adaptive.by_name`` ("pareto_online:10", "ugd_online:1", "learned_uncertainty",
      "pareto_fit:PATH.csv"); ``prediction``: "eps" | "x0" | "v".
    * ``schedule``: "linear" | "cosine", ``T`` timesteps.
    * optimisation: AdamW with ``lr`` (per step), ``weight_decay``, ``betas``, linear warm-up over
      ``warmup_steps`` steps then a constant rate (so extending ``steps`` never changes earlier steps),
      global-norm gradient clipping at ``grad_clip`` (0 or None = off, stored as 0), EMA with
      ``ema_decay``. ``lr`` must be finite and > 0, ``grad_clip`` finite and > 0 (or off), ``steps`` >= 1.
    * ``bf16``: bfloat16 autocast of the forward pass, on CUDA only. ``device``: "cpu" or "cuda".
      ``cpu_threads``: torch intra-op threads during training (None = leave torch's setting); the tiny
      models run fastest with 1. Bit-exact resume on the CPU needs the same thread count in every segment.
    * logging: per-step log every step, per-bin losses over ``bins`` uniform timestep bins aggregated over
      every ``log_every`` steps; checkpoints every ``checkpoint_every`` steps and at the end.
      ``keep_checkpoints``: also keep the weights of every ``checkpoint_every`` step as
      ``checkpoints/step{N}.safetensors`` (the content of ``model.safetensors`` at step N: raw + EMA weights and
      the metadata), for ``gradconflict track --model RUN``; a resume keeps the files already written.
    """

    data: str = "mnist"
    model: str = "dit-tiny"
    weighting: str = "min_snr:5"
    prediction: str = "eps"
    schedule: str = "linear"
    T: int = 1000
    steps: int = 1000
    batch_size: int = 64
    lr: float = 3e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 100
    grad_clip: Optional[float] = 1.0
    ema_decay: float = 0.999
    seed: int = 0
    device: str = "cpu"
    cpu_threads: Optional[int] = None
    bf16: bool = True
    image_size: int = 16
    data_limit: Optional[int] = None
    scale: str = "auto"
    conditional: bool = False
    model_overrides: dict[str, Any] = field(default_factory=dict)
    log_every: int = 10
    checkpoint_every: int = 500
    bins: int = 10
    keep_checkpoints: bool = False
    null_conditioning: Optional[str] = None
    null_length: int = NULL_LENGTH

    def __post_init__(self) -> None:
        self.prediction = normalize_prediction(self.prediction)
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        self.model_overrides = dict(self.model_overrides)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; use one of {list(SCHEDULES)}")
        for name in ("steps", "batch_size", "T", "log_every", "checkpoint_every", "bins", "image_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}; use {name} >= 1")
        self.model = normalize_model(self.model)
        if not is_builtin(self.model) and self.model_overrides:
            raise ValueError(f"model_overrides {self.model_overrides} apply to built-in models only, not to "
                             f"{self.model!r}; set those fields in your build function")
        if self.null_conditioning is not None:
            if is_builtin(self.model):
                raise ValueError(f"null_conditioning applies to text-conditioned models of your own; the built-in "
                                 f"{self.model} has no cross-attention: drop it, or use a user model spec "
                                 "(path/file.py:function or diffusers:PATH)")
            if not isinstance(self.null_conditioning, str) or not self.null_conditioning.strip():
                raise ValueError(f"null_conditioning must be 'zeros' or a .npy path, got {self.null_conditioning!r}")
            if self.null_conditioning != "zeros":  # the same file given relative or absolute is the same run
                self.null_conditioning = str(Path(self.null_conditioning).resolve())
        if not isinstance(self.null_length, int) or isinstance(self.null_length, bool) or self.null_length < 1:
            raise ValueError(f"null_length must be a positive integer (tokens), got {self.null_length!r}")
        if self.null_conditioning != "zeros":  # the length of zeros only: elsewhere it has no effect on the run
            self.null_length = NULL_LENGTH
        if not isinstance(self.keep_checkpoints, bool):
            raise ValueError(f"keep_checkpoints must be True or False, got {self.keep_checkpoints!r}")
        if self.scale not in ("auto", "none", "minmax"):
            raise ValueError(f"unknown scale {self.scale!r}; use 'auto', 'none' or 'minmax' (see gradconflict.data)")
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ValueError(f"cpu_threads must be >= 1 (or None), got {self.cpu_threads}")
        if self.bins > self.T:
            raise ValueError(f"bins ({self.bins}) cannot exceed T ({self.T})")
        if not _real(self.lr) or not math.isfinite(self.lr) or self.lr <= 0:
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}; use e.g. lr=3e-4")
        if not _real(self.weight_decay) or not math.isfinite(self.weight_decay) or self.weight_decay < 0:
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay!r}; use 0 for none")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}; use 0 for no warm-up")
        if self.grad_clip is None:
            self.grad_clip = 0.0  # off; stored as 0 (the historical spelling) so that both are the same run
        if not _real(self.grad_clip) or not math.isfinite(self.grad_clip) or self.grad_clip < 0:
            raise ValueError(f"grad_clip must be a finite number > 0, or 0 / None for no clipping, got {self.grad_clip!r}")
        self.grad_clip = float(self.grad_clip)
        if len(self.betas) != 2 or not all(math.isfinite(b) and 0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be two finite numbers in [0, 1), got {self.betas!r}; use e.g. (0.9, 0.999)")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in [0, 1), got {self.ema_decay}")
        from ..adaptive import check_spec

        check_spec(self.weighting)  # fail early on an unknown weighting (fixed or adaptive spec)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        out = dataclasses.asdict(self)
        out["betas"] = list(self.betas)
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        """Config from ``to_dict``'s output (a ``config.json``, whose ``"used"`` entry, what the run used, is no
        field and is skipped); unknown keys raise ``ValueError``."""
        valid = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in values.items() if k != USED_KEY}
        unknown = sorted(set(values) - valid)
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s) {unknown}; valid fields: {sorted(valid)}")
        return cls(**values)

    def identity(self) -> dict[str, Any]:
        """The fields that define the run (everything except ``RESUMABLE_FIELDS``, and ``LATER_FIELDS`` at their
        defaults)."""
        return {k: v for k, v in self.to_dict().items()
                if k not in RESUMABLE_FIELDS and not (k in LATER_FIELDS and v == LATER_FIELDS[k])}
