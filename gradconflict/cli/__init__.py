"""The ``gradconflict`` command line: one subcommand per module, each registered by its ``add_parser``."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["main", "build_parser"]

# subcommand modules, each exposing add_parser(subparsers); a module that is missing is skipped
_SUBCOMMANDS = ("reproduce", "gram", "solve", "track", "transfer", "train", "sample", "compare", "bins")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradconflict",
        description="Gradient conflicts between diffusion timesteps, studied as multi-task learning.",
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"gradconflict {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _SUBCOMMANDS:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"{__name__}.{name}":
                continue
            raise
        module.add_parser(sub)
    return parser


def _check_device(requested: Optional[str]) -> None:
    """Raise ``ValueError`` for a ``--device`` that torch cannot parse or that this machine cannot run."""
    if requested is None:
        return
    import torch

    try:
        device = torch.device(requested)
    except RuntimeError:
        raise ValueError(f"unknown --device {requested!r}: use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {requested} was given but CUDA is not available to this torch "
                             f"({torch.__version__}): use --device cpu, or install a CUDA build of torch on a GPU machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {requested}: this machine has {torch.cuda.device_count()} GPU(s); "
                             f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}")


def _check_out(out: Optional[str]) -> None:
    if out is None:
        return
    for folder in (Path(out), *Path(out).parents):  # --out itself, or a folder on its way, may be a file
        if folder.exists():
            if not folder.is_dir():
                where = "" if folder == Path(out) else f" ({folder} is a file)"
                raise ValueError(f"--out {out} is not a folder{where}; pass a folder (it is created if it does not "
                                 "exist)")
            return


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return 2
    from .._io import folder_lock
    from ..distributed import init_from_env, is_main, shutdown

    # under torchrun: a process group from the environment (NCCL for a CUDA --device, else gloo); otherwise nothing
    device = str(getattr(args, "device", None) or "")
    init_from_env(backend=None if device.startswith("cuda") else "gloo")
    try:
        _check_device(getattr(args, "device", None))
        # the folder a command writes (and locks): --out, unless the command names another (sample's --out is a PNG)
        written = getattr(args, "written_folder", None)
        out = written(args) if written is not None else getattr(args, "out", None) if args.command != "sample" else None
        _check_out(out)
        from ._threads import command_threads

        with folder_lock(out) if out is not None and is_main() else contextlib.nullcontext(), command_threads(args):
            result = args.handler(args)
    except (ValueError, FileNotFoundError) as err:  # user mistakes: one line, exit 2; anything else is a bug
        from ..distributed import rank, world_size

        where = f" (rank {rank()} of {world_size()})" if world_size() > 1 else ""  # under torchrun: whose error
        print(f"gradconflict {args.command}{where}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        resumes = args.command in ("train", "track", "transfer", "reproduce", "compare")
        print(f"gradconflict {args.command}: interrupted" + ("; what was finished is saved, and the same command "
              "resumes" if resumes else ""), file=sys.stderr)
        return 130
    shutdown()
    return int(result or 0)
