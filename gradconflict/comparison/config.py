"""Configuration of a convergence comparison (a plain dataclass, saved as ``compare_config.json``)."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from ..train import TrainConfig

__all__ = ["CompareConfig", "preset", "PRESETS", "DEFAULT_WEIGHTINGS", "FIT", "run_name"]

# the paper's four (constant, SNR, Max-SNR-1, Min-SNR-5), Min-SNR's gamma ablation, two smooth variants, and
# the weightings only this toolkit offers (an exact Pareto optimum recomputed online, the paper's UGD online)
# beside the adaptive weighting a user would pick instead (learned uncertainty)
DEFAULT_WEIGHTINGS: tuple[str, ...] = (
    "constant", "snr", "max_snr:1", "min_snr:5", "pareto_fit", "pareto_online:10", "learned_uncertainty",
    "min_snr:1", "min_snr:20", "soft_min_snr:5", "p2", "ugd_online:10",
)  # in the order they train: C4's four first, then C6's, then the gamma ablation and the rest
FIT = "pareto_fit"  # fitted to the exact optimum recorded on the pilot run (``CompareConfig.pilot``, seed 0)

PRESETS: tuple[str, ...] = ("toy", "quick", "standard", "gpu")


def run_name(weighting: str, seed: int) -> str:
    """Folder name of one run: the weighting spec made filesystem-safe, and the seed (``min_snr_5_seed0``)."""
    slug = re.sub(r"[^A-Za-z0-9.]+", "_", weighting).strip("_") or "weighting"
    return f"{slug}_seed{seed}"


@dataclass
class CompareConfig:
    """One comparison: the same model spec trained under each weighting with each seed, evaluated on held-out data.

    * ``model``, ``data``, ``prediction``, ``schedule``, ``image_size``, ``batch_size``, ``lr``, ``warmup_steps``,
      ``ema_decay``: the training run (``gradconflict.train``), the same for every weighting.
    * ``train_images``: the first N images train; the rest of the dataset is held out for every metric (the
      embedded MNIST has 5000, interleaved by class, so both parts are balanced).
    * ``weightings``: specs of ``weighting.by_name`` (fixed) or of the adaptive weightings
      (``pareto_online:M``, ``ugd_online:M``, ``learned_uncertainty``, ``pareto_fit:FILE``). Plain ``pareto_fit``
      is fitted to the exact Pareto weights that the evaluations of the ``pilot`` weighting's seed-0 run recorded
      (held-out Grams at every evaluation step, ridge ``lam``): that run trains first, the fit is written to
      ``OUT/pareto_fit_weights.csv``, then the ``pareto_fit`` runs train.
    * ``seeds``: independently trained models per weighting (the replication unit); seed s is shared across
      weightings (same initial weights and data order: a paired design).
    * ``steps``, ``eval_every``: training length and the evaluation cadence (an evaluation at every multiple of
      ``eval_every`` and at ``steps``).
    * evaluation (held-out): ``eval_per_bin`` timesteps per bin for the per-bin losses over ``bins`` uniform bins;
      ``fd_samples`` DDIM samples (``sample_steps`` steps) for FD-MNIST (MNIST only) with its bootstrap standard error
      over ``fd_draws`` resamples;
      the Pareto score of the fixed strategies on a Gram of ``gram_per_task`` held-out samples per bin at relative
      ridge ``lam`` (x trace(G)/K, the unit of ``track --lam``), with EMA weights (``weights``).
    * ``jobs``: runs trained in parallel processes (each with ``cpu_threads`` torch threads).
    """

    model: str = "unet-tiny"
    data: str = "mnist"
    prediction: str = "eps"
    schedule: str = "linear"
    image_size: int = 16
    train_images: int = 4000
    weightings: tuple[str, ...] = DEFAULT_WEIGHTINGS
    seeds: int = 3
    steps: int = 2000
    eval_every: int = 250
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 100
    ema_decay: float = 0.995
    bins: int = 10
    eval_per_bin: int = 64
    fd_samples: int = 300
    fd_draws: int = 5
    sample_steps: int = 20
    gram_per_task: int = 8
    lam: float = 0.1
    weights: str = "ema"
    device: str = "cpu"
    cpu_threads: Optional[int] = 1
    jobs: int = 1
    pilot: str = "min_snr:5"
    model_overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.weightings = tuple(str(w) for w in self.weightings)
        if not self.weightings:
            raise ValueError("weightings is empty; give at least one, e.g. ('constant', 'min_snr:5')")
        names = [run_name(w, 0) for w in self.weightings]
        if len(set(names)) != len(names):
            raise ValueError(f"weightings {list(self.weightings)} name the same run folder twice; give each once")
        for name in ("seeds", "steps", "eval_every", "train_images", "batch_size", "bins", "eval_per_bin",
                     "fd_samples", "fd_draws", "sample_steps", "gram_per_task", "jobs", "image_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.eval_every > self.steps:
            raise ValueError(f"eval_every ({self.eval_every}) exceeds steps ({self.steps}); use eval_every <= steps")
        if not self.lam >= 0:
            raise ValueError(f"lam must be >= 0 (relative to trace(G)/K), got {self.lam}")
        if self.weights not in ("ema", "raw"):
            raise ValueError(f"weights must be 'ema' or 'raw', got {self.weights!r}")
        if self.fd and (self.fd_samples < 128 or self.fd_draws < 2):
            raise ValueError(f"FD-MNIST needs fd_samples >= 128 (twice its 64 features) and fd_draws >= 2, got "
                             f"{self.fd_samples} and {self.fd_draws}")
        if FIT in self.weightings and self.pilot not in self.weightings:
            raise ValueError(f"pareto_fit is fitted on the pilot run of {self.pilot!r}, which is not among the "
                             f"weightings {list(self.weightings)}; add it, or set pilot to one of them")
        for weighting in self.weightings:  # fail early on an unknown spec: every run would fail anyway
            if weighting != FIT:
                self.train_config(weighting, 0)

    @property
    def fd(self) -> bool:
        """FD-MNIST is measured on MNIST only (its classifier and reference are MNIST digits)."""
        return str(self.data).strip().lower() == "mnist"

    @property
    def eval_steps(self) -> list[int]:
        """The steps at which every run is evaluated: multiples of ``eval_every``, and ``steps``."""
        steps = list(range(self.eval_every, self.steps + 1, self.eval_every))
        return steps if steps[-1] == self.steps else [*steps, self.steps]

    def train_config(self, weighting: str, seed: int, steps: Optional[int] = None,
                     fit_file: Optional[str] = None) -> TrainConfig:
        """The ``TrainConfig`` of one run (up to ``steps``, default the comparison's length); ``pareto_fit`` needs
        the pilot's weights file ``fit_file``."""
        if weighting == FIT:
            if fit_file is None:
                raise ValueError("pareto_fit needs the pilot run's Pareto weights (fit_file)")
            weighting = f"{FIT}:{fit_file}"
        return TrainConfig(
            data=self.data, model=self.model, weighting=weighting, prediction=self.prediction, schedule=self.schedule,
            steps=steps or self.steps, batch_size=self.batch_size, lr=self.lr, warmup_steps=self.warmup_steps,
            ema_decay=self.ema_decay, seed=seed, device=self.device, cpu_threads=self.cpu_threads,
            image_size=self.image_size, data_limit=self.train_images, bins=self.bins,
            log_every=min(self.eval_every, 50), checkpoint_every=self.eval_every,
            model_overrides=dict(self.model_overrides),
        )

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["weightings"] = list(self.weightings)
        return out

    def identity(self) -> dict[str, Any]:
        """What the runs' results depend on (not the run list, the length, nor how they are executed)."""
        skip = {"weightings", "seeds", "steps", "jobs", "device", "cpu_threads"}
        return {k: v for k, v in self.to_dict().items() if k not in skip}


def preset(kind: str, device: str = "cpu") -> CompareConfig:
    """``toy``: seconds (tests); ``quick``: a smoke run of a few minutes; ``standard``: the committed figures,
    11 weightings x 3 seeds of unet-tiny on 16x16 MNIST (runs resume, so it may be completed in several goes);
    ``gpu``: the standard comparison sized for one GPU (longer runs, more samples)."""
    if kind == "toy":
        return CompareConfig(data="synthetic", model="dit-tiny", image_size=8, train_images=48,
                             weightings=("constant", "min_snr:5"), seeds=2, steps=4, eval_every=2, batch_size=8,
                             warmup_steps=1, bins=4, eval_per_bin=2, fd_samples=24, fd_draws=2, sample_steps=2,
                             gram_per_task=2, device=device,
                             model_overrides={"hidden_size": 16, "depth": 1, "num_heads": 2})
    if kind == "quick":
        return CompareConfig(weightings=("constant", "snr", "max_snr:1", "min_snr:5"), seeds=2, steps=300,
                             eval_every=150, eval_per_bin=16, fd_samples=200, fd_draws=4, sample_steps=10,
                             device=device)
    if kind == "standard":  # 12 weightings x 3 seeds x 1250 steps, 5 evaluations each: about 90 minutes on 2 cores
        return CompareConfig(steps=1250, eval_every=250, fd_samples=300, fd_draws=5, sample_steps=20, jobs=2,
                             device=device)
    if kind == "gpu":
        return CompareConfig(steps=10000, eval_every=1000, batch_size=128, fd_samples=2000, sample_steps=50,
                             seeds=3, device=device, cpu_threads=None)
    raise ValueError(f"unknown preset {kind!r}; use one of {list(PRESETS)}")
