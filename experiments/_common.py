"""Shared command line of the figure scripts: each regenerates its figure from the cached reproduction run."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from gradconflict.reproduce import preset
from gradconflict.reproduce.pipeline import reproduce


@dataclass
class FigureConfig:
    """``preset``: "quick" (CPU, minutes), "full" (GPU) or "toy"; ``device``; ``out``: folder receiving
    figures/ and runs/ (the stages are shared with ``gradconflict reproduce`` and cached there)."""

    preset: str = "quick"
    device: str = "cpu"
    out: str = "."
    progress: bool = True


def run_figure(name: str, doc: str) -> None:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=["quick", "full", "toy"], default="quick")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=".")
    args = p.parse_args()
    cfg = FigureConfig(args.preset, args.device, args.out)
    reproduce(preset(cfg.preset, device=cfg.device), cfg.out, progress=cfg.progress, only=[name])
    print(f"wrote {cfg.out}/figures/{name}.png and .csv")
