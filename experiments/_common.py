"""Shared command line of the figure scripts: each regenerates its figure from the cached reproduction run."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, Optional, Sequence

from gradconflict.reproduce import preset
from gradconflict.reproduce.pipeline import reproduce

PRESETS = ("quick", "standard", "full", "toy")


@dataclass
class FigureConfig:
    """``preset``: "quick" (CPU, minutes), "full" (GPU) or "toy"; ``device``; ``out``: folder receiving
    figures/ and runs/ (the stages are shared with ``gradconflict reproduce`` and cached there)."""

    preset: str = "quick"
    device: str = "cpu"
    out: str = "."
    progress: bool = True


def figure_parser(doc: Optional[str]) -> argparse.ArgumentParser:
    """The options every figure script takes: ``--preset`` (or ``--quick``/``--full``/``--toy``, as in
    ``gradconflict reproduce``), ``--device``, ``--out DIR`` and ``--no-progress``."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--preset", choices=PRESETS,
                      help="quick: tiny DiT on 16x16 MNIST, minutes on a CPU (default); standard: 3 unet-tiny models "
                           "(the committed figures); full: DiT-S/2-like at 32x32, for a GPU; toy: seconds, a smoke test")
    size.add_argument("--quick", dest="preset", action="store_const", const="quick", help="same as --preset quick")
    size.add_argument("--standard", dest="preset", action="store_const", const="standard",
                      help="same as --preset standard")
    size.add_argument("--full", dest="preset", action="store_const", const="full", help="same as --preset full")
    size.add_argument("--toy", dest="preset", action="store_const", const="toy", help="same as --preset toy")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--out", default=".", metavar="DIR",
                   help="folder that receives figures/ and runs/ (the cache shared with `gradconflict reproduce`; "
                        "default: here)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(preset="quick")
    return p


def parse_figure_args(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse and check ``argv``: ``--out`` must name a folder, not a PNG file."""
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.suffix.lower() in {".png", ".csv", ".pdf", ".svg"}:
        folder = out.parent.parent if out.parent.name == "figures" else out.parent
        parser.error(f"--out is the output folder (figures/ and runs/ are written under it), got the file name "
                     f"{args.out!r}; pass a folder instead, e.g. --out {folder}")
    return args


def fail(parser: argparse.ArgumentParser, err: Exception) -> NoReturn:
    """A user mistake (``ValueError``, ``FileNotFoundError``): one line on stderr, exit status 2."""
    parser.exit(2, f"{parser.prog}: error: {err}\n")


def run_figure(name: str, doc: Optional[str], argv: Optional[Sequence[str]] = None) -> None:
    """Parse the shared options and regenerate figure ``name`` (and the cached stages it needs) into OUT."""
    parser = figure_parser(doc)
    args = parse_figure_args(parser, argv)
    cfg = FigureConfig(args.preset, args.device, args.out, progress=not args.no_progress)
    config = preset(cfg.preset, device=cfg.device)
    try:
        reproduce(config, cfg.out, progress=cfg.progress, only=[name])
    except (ValueError, FileNotFoundError) as err:
        fail(parser, err)
    print(f"wrote {config.figures_dir(cfg.out) / name}.png and .csv")
