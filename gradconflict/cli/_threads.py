"""``--threads N``: torch's intra-op CPU threads for one command.

Default (``default_threads``): 1 on a machine with at most 4 CPU cores, where the models of this toolkit run
fastest single-threaded (on a loaded 2-core machine torch's default of 2 threads was 3x slower than 1), else torch's
own default (one thread per physical core, which pays off for larger models and batches). When
``OMP_NUM_THREADS`` is set, torch's setting (which follows it) is kept. The count is set for the command and
restored afterwards, so calling ``gradconflict.cli.main`` from Python leaves the process as it was.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from typing import Iterator, Optional

__all__ = ["SMALL_MACHINE_CORES", "default_threads", "add_threads_flag", "command_threads", "THREADS_HELP"]

SMALL_MACHINE_CORES = 4  # at most this many CPU cores: 1 thread by default

THREADS_HELP = ("torch CPU threads (default: 1 on a machine with at most 4 cores, else torch's default of one per "
                "physical core; torch's setting when OMP_NUM_THREADS is set)")


def default_threads() -> int:
    """The default ``--threads``: 1 with at most ``SMALL_MACHINE_CORES`` CPU cores (``os.cpu_count()``) unless
    ``OMP_NUM_THREADS`` is set, else ``torch.get_num_threads()``."""
    import torch

    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    return 1 if (os.cpu_count() or 1) <= SMALL_MACHINE_CORES else torch.get_num_threads()


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; use e.g. --threads 1") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} threads; use --threads 1 or more")
    return value


def add_threads_flag(parser: argparse.ArgumentParser) -> None:
    """Add ``--threads N`` (applied by ``command_threads`` around the command)."""
    parser.add_argument("--threads", type=_positive, default=None, help=THREADS_HELP)
    parser.set_defaults(_torch_threads=True)


@contextlib.contextmanager
def command_threads(args: argparse.Namespace) -> Iterator[Optional[int]]:
    """For a command with ``add_threads_flag``: set torch's threads to ``--threads`` (or ``default_threads()``),
    record the count used in ``args.threads``, and restore the previous count afterwards; else do nothing."""
    if not getattr(args, "_torch_threads", False):
        yield None
        return
    import torch

    before = torch.get_num_threads()
    args.threads = args.threads if args.threads is not None else default_threads()
    del args._torch_threads  # not a setting of the command (gram_config.json records vars(args))
    torch.set_num_threads(args.threads)
    try:
        yield args.threads
    finally:
        torch.set_num_threads(before)
