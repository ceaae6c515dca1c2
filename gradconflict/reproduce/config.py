"""Presets of the one-command reproduction (plain dataclasses)."""

from __future__ import annotations

import dataclasses
import hashlib
import json

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

from ..track import TrackConfig
from ..train import TrainConfig

__all__ = ["ReproduceConfig", "preset", "check_edges", "PRESETS", "STANDARD_STEPS"]

PRESETS = ("quick", "standard", "full", "toy")
STANDARD_STEPS = 3000  # unet-tiny draws mostly readable digits at 2000 (held-out loss <= 0.15 of predicting zero in every bin)


@dataclass
class ReproduceConfig:
    """Everything ``gradconflict reproduce`` runs: for each of ``seeds`` independently trained models (training
    seeds ``train.seed + s``, the replication unit of every claim) a training run tracked every ``every`` steps,
    then the transfer matrix of the final model (its raw weights, the last point of the tracked trajectory;
    samples.png uses the EMA weights of model 0).

    * ``transfer_variants``: further transfer runs of every model, name -> overrides of ``transfer`` (e.g.
      ``{"sgd": {"optimizer": "sgd", "lr": 0.05}}``); the primary run is named by its optimizer.
    * ``transfer_loss``: "x0" (the paper's plain x0 loss) or "training" (fine-tune in the loss the model was
      trained with: its prediction space and weighting, restricted to the bin).
    * ``binnings``: C3's binning controls, e.g. ``("uniform_K10", "log_snr_K50")`` (``c3.binning_variants``
      names), each with its own Grams of every final model (``track.per_task`` x ``track.resamples``);
      ``own_space``: also the Grams in the model's own loss space (uniform bins, K = ``track.bins``).
    * ``held_out``: images after the training images used for the per-bin "has it learned" check (0: off).
    * ``c2``: keyword arguments of ``c2.c2_online`` (online UGD through each model's tracked checkpoints).
    * ``bins_edges``: K + 1 timestep edges ``0 = e_0 < ... < e_K = train.T`` (e.g. clustered bins of
      ``gradconflict bins``) that replace the uniform bins of every bin-dependent stage (tracking Grams, transfer,
      C2, C3, the held-out check); the trained models and snapshots are reused. None (default): uniform bins.
      See :meth:`clustered` for the config the stages then run with.
    """

    name: str
    train: TrainConfig
    track: TrackConfig
    every: int
    transfer: dict[str, Any] = field(default_factory=dict)  # TransferConfig fields
    transfer_bins: int = 10
    sample_steps: int = 50
    cpu_threads: Optional[int] = None  # torch threads on the CPU (1 is fastest for the tiny models on 2 cores)
    seeds: int = 1
    transfer_variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    transfer_loss: str = "x0"
    binnings: tuple[str, ...] = ()
    own_space: bool = False
    held_out: int = 0
    c2: dict[str, Any] = field(default_factory=dict)  # c2.c2_online settings (per_task, iters, burn_in, ...)
    bins_edges: Optional[tuple[int, ...]] = None

    def __post_init__(self) -> None:
        if isinstance(self.seeds, bool) or not isinstance(self.seeds, int) or self.seeds < 1:
            raise ValueError(f"seeds must be a positive number of independently trained models, got {self.seeds!r}")
        if self.transfer_loss not in ("x0", "training"):
            raise ValueError(f"transfer_loss must be 'x0' or 'training', got {self.transfer_loss!r}")
        self.binnings = tuple(self.binnings)
        if self.bins_edges is not None:
            self.bins_edges = check_edges(self.bins_edges, self.train.T)

    @property
    def bins_key(self) -> str:
        """12 hex digits naming ``bins_edges`` (the folder ``clustered-<key>`` of its cached stages); "" without."""
        if self.bins_edges is None:
            return ""
        return hashlib.sha256(json.dumps(list(self.bins_edges)).encode()).hexdigest()[:12]

    def clustered(self) -> "ReproduceConfig":
        """The config the stages run with under ``bins_edges``: the tracking config's ``edges`` (K = the file's K),
        ``transfer_bins`` = K, and no C3 binning controls (``binnings``: a separate control of its own bins);
        ``self`` when ``bins_edges`` is None."""
        if self.bins_edges is None:
            return self
        K = len(self.bins_edges) - 1
        return replace(self, track=replace(self.track, bins=K, edges=self.bins_edges), transfer_bins=K, binnings=())

    def transfer_timestep_bins(self) -> Any:
        """The bins of the transfer runs: ``bins_edges`` when given, else ``transfer_bins`` uniform bins."""
        from ..bins import TimestepBins

        if self.bins_edges is not None:
            return TimestepBins.from_edges(self.bins_edges, self.train.T)
        return TimestepBins.uniform(self.train.T, self.transfer_bins)

    def task_timestep_bins(self) -> Any:
        """The bins of C2's online run and the held-out check: ``bins_edges`` when given, else K = ``track.bins``
        uniform bins (as before ``bins_edges`` existed, whatever ``track.binning`` says)."""
        from ..bins import TimestepBins

        if self.bins_edges is not None:
            return TimestepBins.from_edges(self.bins_edges, self.train.T)
        return TimestepBins.uniform(self.train.T, self.track.bins)

    def train_of(self, seed: int) -> TrainConfig:
        """The training config of model ``seed`` (0 .. seeds - 1): training seed ``train.seed + seed``."""
        return replace(self.train, seed=self.train.seed + seed)

    def transfer_runs(self) -> dict[str, dict[str, Any]]:
        """Name -> TransferConfig fields of every transfer run (the primary first, named by its optimizer)."""
        base = dict(self.transfer)
        if self.transfer_loss == "training":
            base |= {"loss_space": self.train.prediction, "weighting": self.train.weighting}
        runs = {str(base.get("optimizer", "adamw")): base}
        for name, over in self.transfer_variants.items():
            runs[name] = {**base, **over}
        return runs

    def figures_dir(self, out: str | Path) -> Path:
        """Where this preset writes its figures and REPORT.md: ``out/figures`` (the committed figures are the standard
        preset's), except the quick preset's ``out/figures/quick``, so that the README's main job never overwrites
        the committed figures with one model's undecided verdicts."""
        return Path(out) / "figures" / ("quick" if self.name == "quick" else "")

    def identity(self, stage: str, seed: int = 0) -> dict[str, Any]:
        """The inputs a stage of model ``seed`` depends on (a changed value reruns that stage and what follows)."""
        identity = self._identity(stage, seed)
        if self.bins_edges is not None and stage != "track":  # (the tracking config holds them as its edges)
            identity["edges"] = list(self.bins_edges)
        return identity

    def _identity(self, stage: str, seed: int) -> dict[str, Any]:
        tc = self.train_of(seed)
        train = tc.identity() | {"steps": tc.steps, "seed": tc.seed}
        if stage == "track":
            return {"train": train, "track": self.track.to_dict(), "every": self.every}
        if stage == "transfer":
            return {"train": train, "transfer": self.transfer, "bins": self.transfer_bins}
        if stage.startswith("transfer-"):
            return {"train": train, "transfer": self.transfer_runs()[stage[len("transfer-"):]], "bins": self.transfer_bins}
        if stage.startswith("grams-") or stage == "learned":
            return {"train": train, "track": self.track.to_dict(), "held_out": self.held_out, "stage": stage}
        if stage == "c2":
            return {"train": train, "every": self.every, "c2": self.c2, "lam": self.track.lam}
        return asdict(self)


def check_edges(edges: Any, T: int) -> tuple[int, ...]:
    """``edges`` as a tuple of ints, checked to be K + 1 >= 4 strictly increasing timesteps from 0 to ``T`` (the
    schedule's timesteps 0..T-1 covered; K >= 3 bins, as C1's near and far cells need)."""
    e = tuple(int(x) for x in edges)
    if len(e) < 4:
        raise ValueError(f"bins_edges hold {len(e) - 1} bin(s); the analysis needs K >= 3 bins (C1's far cells are "
                         "|i - j| >= 2 apart): cluster into more bins (gradconflict bins --bins K)")
    if e[0] != 0 or e[-1] != T:
        raise ValueError(f"bins_edges cover t = {e[0]}..{e[-1] - 1} but the schedule has T = {T} timesteps "
                         f"(0..{T - 1}); make the bins for this schedule (gradconflict bins --model of this run)")
    if any(b <= a for a, b in zip(e, e[1:])):
        raise ValueError(f"bins_edges {list(e)} must be strictly increasing (every bin non-empty)")
    return e


def preset(kind: str, device: str = "cpu") -> ReproduceConfig:
    """"quick": one tiny DiT on 16x16 MNIST, about 6 minutes on 2 CPU cores (one model: verdicts stay
    undecided); "standard": the committed figures, 3 unet-tiny models on 16x16 MNIST (<= 90 minutes on 2 CPU
    cores), transfer with AdamW and SGD in the training loss, C3's binning and loss-space controls; "full":
    DiT-S/2-like at 32x32 on a GPU; "toy": seconds, 2 models, for tests."""
    if kind == "toy":
        return ReproduceConfig(
            name="toy",
            train=TrainConfig(data="synthetic", model="dit-tiny", weighting="snr", steps=6, batch_size=8, warmup_steps=2,
                              image_size=8, data_limit=64, device=device, log_every=2, checkpoint_every=1000, bins=4,
                              model_overrides={"hidden_size": 16, "depth": 1, "num_heads": 2}),
            track=TrackConfig(bins=4, per_task=2, resamples=2, ugd_steps=100, fw_max_iter=100),
            every=3,
            transfer=dict(steps=2, lr=1e-3, eval_samples=4, seeds=2, batch_size=4, progress=False),
            transfer_bins=4,
            sample_steps=4,
            cpu_threads=1,
            seeds=2,
            transfer_variants={"sgd": {"optimizer": "sgd", "lr": 1e-2}},
            transfer_loss="training",
            binnings=("log_snr_K4",),
            own_space=True,
            held_out=16,
            c2=dict(per_task=1, iters=2, burn_in=1, warmup=1, eval_per_task=2),
        )
    if kind == "quick":
        return ReproduceConfig(
            name="quick",
            train=TrainConfig(data="mnist", model="dit-tiny", weighting="snr", steps=1200, batch_size=64, lr=1e-3,
                              warmup_steps=100, image_size=16, device=device, log_every=20, checkpoint_every=1000),
            track=TrackConfig(bins=10, per_task=8, resamples=3, ugd_steps=10000),
            every=200,
            transfer=dict(steps=50, lr=1e-4, eval_samples=128, seeds=3, batch_size=32),
            transfer_loss="training",
            transfer_bins=10,
            cpu_threads=1,
            held_out=512,  # trained on all of MNIST: the check uses its last 512 training images (said in REPORT)
        )
    if kind == "standard":
        return ReproduceConfig(
            name="standard",
            train=TrainConfig(data="mnist", model="unet-tiny", weighting="snr", steps=STANDARD_STEPS, batch_size=64,
                              lr=1e-3, warmup_steps=100, image_size=16, data_limit=4000, device=device, log_every=50,
                              checkpoint_every=500),
            track=TrackConfig(bins=10, per_task=8, resamples=3, ugd_steps=10000),
            every=STANDARD_STEPS // 4,
            transfer=dict(steps=50, lr=1e-4, optimizer="adamw", eval_samples=128, seeds=2, batch_size=32),
            # SGD clipped at 1.0 like the training run; lr 0.005 is the largest of {0.05, 0.005, 0.001} at which
            # fine-tuning on every bin lowers that bin's own loss on model 0 (at 0.05 bin 900-999's own loss grew 14x;
            # unclipped, bin 0-99 diverged: its SNR weight is ~1e4)
            transfer_variants={"sgd": {"optimizer": "sgd", "lr": 0.005, "grad_clip": 1.0}},
            transfer_loss="training",
            transfer_bins=10,
            sample_steps=50,
            cpu_threads=1,
            seeds=3,
            binnings=("log_snr_K10", "uniform_K50", "log_snr_K50"),
            own_space=True,
            held_out=512,
        )
    if kind == "gpu":  # issue #19 goal 4: the standard analysis sized for one H100 within 8 minutes (not yet timed)
        base = preset("standard", device="cuda" if device == "cpu" else device)
        base.train = dataclasses.replace(base.train, steps=6000, batch_size=128, checkpoint_every=1500)
        return dataclasses.replace(base, name="gpu", every=1500, cpu_threads=None)
    if kind == "full":
        return ReproduceConfig(
            name="full",
            train=TrainConfig(data="mnist", model="dit-s", weighting="snr", steps=20000, batch_size=128, lr=1e-4,
                              warmup_steps=500, image_size=32, device=device, log_every=50, checkpoint_every=2000),
            track=TrackConfig(bins=20, per_task=32, resamples=5, ugd_steps=10000),
            every=1000,
            transfer=dict(steps=200, lr=1e-4, eval_samples=256, seeds=3, batch_size=64),
            transfer_bins=10,
        )
    raise ValueError(f"unknown preset {kind!r}; use 'quick', 'standard', 'gpu', 'full' or 'toy'")
