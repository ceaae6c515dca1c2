"""Train one model spec under several weightings and seeds, evaluate every run on held-out data, resumably.

Layout of ``out``:

* ``compare_identity.json``: what the results depend on (a rerun with other settings is refused) and
  ``compare_config.json``: the last command's full settings;
* ``runs/<weighting>_seed<s>/``: a ``gradconflict train`` folder per run (bit-exact resume), plus
  ``evals.csv`` (one row per evaluation step, ``EVAL_COLUMNS`` and ``seconds_per_step``) and ``eval_losses.csv``
  (held-out loss per bin per evaluation step) and ``eval_weights.csv`` (the exact Pareto weights per bin of the
  held-out Gram), rewritten atomically after each evaluation;
* ``evals.csv`` and ``eval_losses.csv``: every run's rows with ``weighting`` and ``seed`` columns (tidy).

A run is trained segment by segment (``train`` up to each evaluation step, then evaluated): an interrupted
comparison resumes in the segment it stopped in, and evaluations already in a run's ``evals.csv`` are skipped.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Optional

import multiprocessing as mp
import pandas as pd
import torch
from tqdm.auto import tqdm

from .._io import record_identity, write_csv, write_json
from ..data import load_dataset
from ..train import train
from ..train.checkpoint import load_trained
from .config import FIT, CompareConfig, run_name
from .evaluate import HeldOut, evaluate

__all__ = ["compare", "run_one", "load_compare", "held_out_images"]


def held_out_images(config: CompareConfig) -> torch.Tensor:
    """The images after the first ``train_images`` of the dataset (refused when none are left)."""
    dataset = load_dataset(config.data, image_size=config.image_size)
    images = dataset.images[config.train_images:]
    if len(images) < 2:
        raise ValueError(f"{config.data} has {len(dataset.images)} images and train_images = {config.train_images} "
                         "leaves none held out for evaluation; lower train_images")
    return images


def _held_out(config: CompareConfig) -> HeldOut:
    images = held_out_images(config)
    extractor = None
    if config.fd:  # FD-MNIST: a Fréchet distance in an MNIST classifier's features, against held-out digits
        from ..metrics import fd_mnist_features

        extractor = fd_mnist_features(image_size=config.image_size, progress=False)
    return HeldOut(images, extractor)


def _read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path) if path.is_file() else pd.DataFrame()


def _without(frame: pd.DataFrame, step: int) -> pd.DataFrame:
    return frame[frame["step"] != step] if len(frame) else frame


def fit_file(out: str | Path) -> Path:
    """Where ``pareto_fit``'s target weights (the pilot run's exact optima) are written."""
    return Path(out).resolve() / "pareto_fit_weights.csv"


def write_fit_file(config: CompareConfig, out: str | Path) -> Path:
    """Write ``pareto_fit_weights.csv`` from the pilot run's recorded optima (once: a rerun keeps the file, so
    the pareto_fit runs resume with the weighting they started with)."""
    path = fit_file(out)
    if not path.is_file():
        source = Path(out) / "runs" / run_name(config.pilot, 0) / "eval_weights.csv"
        if not source.is_file():
            raise ValueError(f"pareto_fit needs the pilot run's {source}; train the pilot ({config.pilot}, seed 0) first")
        write_csv(pd.read_csv(source), path)
    return path


def run_one(config: CompareConfig, weighting: str, seed: int, out: str | Path, *, held_out: Optional[HeldOut] = None,
            progress: bool = False) -> pd.DataFrame:
    """Train and evaluate one run (resuming what ``out/runs/<name>`` holds); returns its ``evals.csv`` table.
    A ``pareto_fit`` run needs the pilot's weights file (:func:`write_fit_file`)."""
    folder = Path(out) / "runs" / run_name(weighting, seed)
    evals, per_bin = _read(folder / "evals.csv"), _read(folder / "eval_losses.csv")
    optima = _read(folder / "eval_weights.csv")
    done = set(evals["step"].astype(int)) if len(evals) else set()
    todo = [s for s in config.eval_steps if s not in done]
    if not todo:
        return evals
    held_out = held_out or _held_out(config)
    for step in todo:
        fit = str(fit_file(out)) if weighting == FIT else None
        log = train(config.train_config(weighting, seed, steps=step, fit_file=fit), folder, progress=progress)
        model, schedule, prediction = load_trained(folder, ema=config.weights == "ema", device=config.device)
        row, bins, optimum = evaluate(model, schedule, prediction, held_out, config, weighting, step)
        seconds = log["seconds"].astype(float).to_numpy()
        row["train_seconds"] = float(seconds[-1])
        row["seconds_per_step"] = float(seconds[-1] / len(seconds))
        evals = pd.concat([evals, pd.DataFrame([row])], ignore_index=True)
        # rows of this step from an evaluation killed before its evals.csv row was written are replaced
        per_bin = pd.concat([_without(per_bin, step), bins], ignore_index=True)
        optima = pd.concat([_without(optima, step), optimum], ignore_index=True)
        write_csv(per_bin, folder / "eval_losses.csv")
        write_csv(optima, folder / "eval_weights.csv")
        write_csv(evals, folder / "evals.csv")  # last: a step in evals.csv has its per-bin rows
    return evals


def _worker(args: tuple[CompareConfig, str, int, str]) -> tuple[str, int]:
    config, weighting, seed, out = args
    torch.set_num_threads(config.cpu_threads or 1)
    run_one(config, weighting, seed, out)
    return weighting, seed


def _collect(config: CompareConfig, out: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    evals, per_bin = [], []
    for weighting in config.weightings:
        for seed in range(config.seeds):
            folder = out / "runs" / run_name(weighting, seed)
            for frames, name in ((evals, "evals.csv"), (per_bin, "eval_losses.csv")):
                frame = _read(folder / name)
                if len(frame):
                    frame = frame[frame["step"] <= config.steps]
                    frames.append(frame.assign(weighting=weighting, seed=seed))
    cat = lambda frames: pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()  # noqa: E731
    return cat(evals), cat(per_bin)


def load_compare(out: str | Path, config: Optional[CompareConfig] = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(evals, eval_losses)`` of a comparison folder, every run's rows with ``weighting`` and ``seed`` columns."""
    out = Path(out)
    if config is None:
        config = CompareConfig(**json.loads((out / "compare_config.json").read_text()))
    return _collect(config, out)


def _parallel(config: CompareConfig, out: Path, runs: list, fitted: list, bar: Any) -> None:
    """The runs in ``config.jobs`` processes (spawned, one BLAS thread each), at most ``jobs`` submitted at a time
    so that the pareto_fit runs go next as soon as the pilot (the first of ``runs``) is done."""
    _held_out(config)  # trains and caches the FD-MNIST classifier once, before the workers read it
    env = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    os.environ.update({k: str(config.cpu_threads or 1) for k in env})  # inherited by the spawned workers
    queue = list(runs)
    try:
        with ProcessPoolExecutor(config.jobs, mp_context=mp.get_context("spawn")) as pool:
            running: dict = {}
            while queue or running:
                while queue and len(running) < config.jobs:
                    w, s = queue.pop(0)
                    running[pool.submit(_worker, (config, w, s, str(out)))] = (w, s)
                done = next(as_completed(running))
                weighting, seed = running.pop(done)
                done.result()
                if fitted and (weighting, seed) == runs[0]:
                    write_fit_file(config, out)
                    queue = list(fitted) + queue
                bar.set_postfix_str(run_name(weighting, seed))
                bar.update(1)
    finally:
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def compare(config: CompareConfig, out: str | Path, *, progress: bool = True) -> pd.DataFrame:
    """Run (or resume) every (weighting, seed) of ``config`` in ``out``; returns the tidy evaluations.

    Columns: ``weighting, seed, step, loss_x0, loss_model, fd_mnist, fd_stderr, pareto_ratio, diag_ratio,
    reg_share, diag_min, diag_max, train_seconds, seconds_per_step``. ``config.jobs > 1`` trains runs in that many
    processes, each with ``config.cpu_threads`` torch threads.
    """
    out = Path(out)
    record_identity(out / "compare_identity.json", config.identity(), "a comparison with other settings",
                    "use another --out, or the settings it was made with (--weightings, --seeds and --steps may change)")
    write_json(out / "compare_config.json", config.to_dict())
    # the pilot first (pareto_fit is fitted to its optima), the pareto_fit runs once it is done
    first = [(config.pilot, 0)] if FIT in config.weightings else []
    # weighting by weighting (all seeds of one before the next), so a comparison stopped early has whole weightings
    runs = first + [(w, s) for w in config.weightings for s in range(config.seeds) if w != FIT and (w, s) not in first]
    fitted = [(FIT, s) for s in range(config.seeds)] if FIT in config.weightings else []
    bar = tqdm(total=len(runs) + len(fitted), disable=not progress, desc="compare runs", dynamic_ncols=True)
    try:
        if config.jobs == 1:
            held_out = _held_out(config)
            queue = list(runs)
            while queue:
                weighting, seed = queue.pop(0)
                bar.set_postfix_str(run_name(weighting, seed))
                run_one(config, weighting, seed, out, held_out=held_out, progress=progress)
                if fitted and (weighting, seed) == runs[0]:  # the pilot is done: the pareto_fit runs go next
                    write_fit_file(config, out)
                    queue = list(fitted) + queue
                bar.update(1)
        else:
            _parallel(config, out, runs, fitted, bar)
    finally:
        bar.close()
    evals, per_bin = _collect(config, out)
    write_csv(evals, out / "evals.csv")
    write_csv(per_bin, out / "eval_losses.csv")
    return evals
