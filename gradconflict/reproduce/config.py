"""Presets of the one-command reproduction (plain dataclasses)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from ..track import TrackConfig
from ..train import TrainConfig

__all__ = ["ReproduceConfig", "preset"]


@dataclass
class ReproduceConfig:
    """Everything ``gradconflict reproduce`` runs: a training run tracked every ``every`` steps, then the
    transfer matrix of the final model (its raw weights, the last point of the tracked trajectory; samples.png
    uses the EMA weights)."""

    name: str
    train: TrainConfig
    track: TrackConfig
    every: int
    transfer: dict[str, Any] = field(default_factory=dict)  # TransferConfig fields
    transfer_bins: int = 10
    sample_steps: int = 50
    cpu_threads: Optional[int] = None  # torch threads on the CPU (1 is fastest for the tiny models on 2 cores)

    def identity(self, stage: str) -> dict[str, Any]:
        """The inputs a stage depends on (a changed value reruns that stage and what follows from it)."""
        train = self.train.identity() | {"steps": self.train.steps}
        if stage == "track":
            return {"train": train, "track": self.track.to_dict(), "every": self.every}
        if stage == "transfer":
            return {"train": train, "transfer": self.transfer, "bins": self.transfer_bins}
        return asdict(self)


def preset(kind: str, device: str = "cpu") -> ReproduceConfig:
    """"quick": the tiny DiT on 16x16 MNIST, about 4-5 minutes on 2 CPU cores; "full": DiT-S/2-like at 32x32
    on a GPU; "toy": seconds, for tests."""
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
        )
    if kind == "quick":
        return ReproduceConfig(
            name="quick",
            train=TrainConfig(data="mnist", model="dit-tiny", weighting="snr", steps=1200, batch_size=64, lr=1e-3,
                              warmup_steps=100, image_size=16, device=device, log_every=20, checkpoint_every=1000),
            track=TrackConfig(bins=10, per_task=8, resamples=3, ugd_steps=10000),
            every=200,
            transfer=dict(steps=50, lr=1e-4, eval_samples=128, seeds=3, batch_size=32),
            transfer_bins=10,
            cpu_threads=1,
        )
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
    raise ValueError(f"unknown preset {kind!r}; use 'quick', 'full' or 'toy'")
