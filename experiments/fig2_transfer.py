"""Paper Fig. 2: the cross-bin fine-tuning transfer matrix of a trained diffusion model (claim C1).

    python experiments/fig2_transfer.py --quick                 # a few minutes on a CPU
    python experiments/fig2_transfer.py                         # longer base training, more steps and seeds
    python experiments/fig2_transfer.py --checkpoint runs/my_run --device cuda

Without ``--checkpoint`` a dit-tiny is trained on MNIST (16x16) with ``gradconflict.train`` (plain
eps-MSE, i.e. the "snr" weighting, AdamW 3e-4) into ``runs/fig2_<model>_<data>_<steps>steps``; a run
already there is reused. Fine-tuning starts from the raw final weights (not the EMA: the EMA is not a
point of the optimiser's trajectory). Then for each of K = 10 uniform bins a copy is fine-tuned with AdamW
on that bin only, and every bin's loss (x0 units, fixed evaluation set) is compared with the base model:
``transfer[i, j] = (L_j(theta_0) - L_j(theta_i)) / L_j(theta_0)``.

Writes ``figures/fig2_transfer.png`` (heatmap and transfer against bin distance) and
``figures/fig2_transfer.csv`` (one row per source and target bin: mean, standard error, losses), and
prints each bin's reach and whether C1 (neighbours improve, distant bins get worse) holds.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from gradconflict.bins import TimestepBins
from gradconflict.data import load_dataset
from gradconflict.spec import load_model
from gradconflict.train import TrainConfig, load_trained, train
from gradconflict.transfer import TransferConfig, TransferResult, distance_profile, plot_transfer, run_transfer
from gradconflict.transfer.plot import describe_setup


@dataclass
class Fig2Config:
    """Base model (trained here unless ``checkpoint`` names a run directory or model spec) and transfer setup."""

    checkpoint: Optional[str] = None
    model: str = "dit-tiny"
    data: str = "mnist"
    image_size: int = 16
    train_steps: int = 3000
    train_batch: int = 64
    train_lr: float = 3e-4
    train_weighting: str = "snr"
    runs: str = "runs"
    bins: int = 10
    steps: int = 100
    lr: float = 1e-4
    batch_size: int = 16
    eval_samples: int = 256
    seeds: int = 4
    device: str = "cpu"
    out: str = "figures/fig2_transfer.png"

    @classmethod
    def quick(cls, **overrides: object) -> "Fig2Config":
        """Minutes on a CPU: 300 training steps, 30 fine-tuning steps, 64 evaluation samples per bin, 2 seeds."""
        return dataclasses.replace(cls(train_steps=300, steps=30, eval_samples=64, seeds=2), **overrides)


def base_model(cfg: Fig2Config):
    """``(model, schedule, prediction, description)``: the given checkpoint, or a cached/new training run."""
    if cfg.checkpoint is not None:
        path = Path(cfg.checkpoint)
        if path.is_dir():
            model, schedule, prediction = load_trained(path, ema=False, device=cfg.device)
            return model, schedule, prediction, f"run {path.name}"
        loaded = load_model(cfg.checkpoint, device=cfg.device)
        return loaded.model, loaded.schedule, loaded.prediction, loaded.source
    run = Path(cfg.runs) / f"fig2_{cfg.model}_{cfg.data}_{cfg.train_steps}steps"
    tc = TrainConfig(data=cfg.data, model=cfg.model, weighting=cfg.train_weighting, prediction="eps", steps=cfg.train_steps,
                     batch_size=cfg.train_batch, lr=cfg.train_lr, image_size=cfg.image_size, device=cfg.device,
                     checkpoint_every=max(cfg.train_steps, 1))
    if not (run / "model.safetensors").is_file():
        print(f"training {cfg.model} on {cfg.data} for {cfg.train_steps} steps into {run}")
        train(tc, run)
    else:
        print(f"reusing the trained model in {run}")
    model, schedule, prediction = load_trained(run, ema=False, device=cfg.device)
    return model, schedule, prediction, f"{cfg.model} ({cfg.train_steps} training steps)"


def c1_verdict(result: TransferResult) -> str:
    """Near (|j - i| <= 1) against far (|j - i| >= K/2) mean transfer; C1 holds when near > 0 > far."""
    prof = distance_profile(result)
    d = prof["distance"].abs()
    near = float(prof.loc[d <= 1, "transfer_mean"].mean())
    far_mask = np.abs(np.subtract.outer(np.arange(result.K), np.arange(result.K))) >= result.K / 2
    far_values = result.matrix[far_mask]
    far = float(far_values.mean())
    share = float((far_values < 0).mean())
    holds = near > 0 > far
    return (f"C1 {'holds' if holds else 'does not hold'}: mean transfer to neighbours (|j-i| <= 1) {near:+.4f}, "
            f"to distant bins (|j-i| >= {result.K // 2}) {far:+.4f} ({share:.0%} of distant pairs negative)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Paper Fig. 2: cross-bin fine-tuning transfer matrix")
    parser.add_argument("--quick", action="store_true", help="a few minutes on a CPU")
    parser.add_argument("--checkpoint", default=None, help="training run directory or model spec (default: train one)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help="PNG path (CSV beside it); default figures/fig2_transfer.png")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in (("checkpoint", args.checkpoint), ("device", args.device), ("out", args.out)) if v is not None}
    cfg = Fig2Config.quick(**overrides) if args.quick else dataclasses.replace(Fig2Config(), **overrides)
    model, schedule, prediction, source = base_model(cfg)
    size = getattr(getattr(model, "config", None), "image_size", cfg.image_size)
    data = load_dataset(cfg.data, image_size=size)
    bins = TimestepBins.uniform(schedule.T, cfg.bins)
    tcfg = TransferConfig(steps=cfg.steps, lr=cfg.lr, batch_size=cfg.batch_size, eval_samples=cfg.eval_samples, seeds=cfg.seeds)
    result = run_transfer(model, data, bins, tcfg, schedule=schedule, prediction=prediction)
    setup = describe_setup(result, source, data.name) + f", {prediction}-prediction, loss in x0 units"
    png = plot_transfer(result, cfg.out, setup=setup, title="Fig. 2: fine-tune on one timestep bin, relative loss change of every bin")
    print(f"{setup}; {'batched' if result.batched else 'sequential'} fine-tuning, {result.seconds:.0f} s")
    for line in result.reach_lines():
        print(line)
    if result.all_row is not None:
        print(f"all bins (control): relative loss reduction {np.array2string(result.all_row, precision=4)}")
    print(c1_verdict(result))
    print(f"wrote {png} and {Path(png).with_suffix('.csv')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
