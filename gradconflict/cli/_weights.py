"""The ``--weights ema|raw`` flag shared by the commands that load a trained model, and the upgrade of folders
recorded before it existed (they hold no ``weights`` key; they resume with the weights they were computed with)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional

from .._io import write_json
from .._loading import describe_weights

__all__ = ["add_weights_flag", "report_weights", "weights_for_folder", "record_legacy_weights"]

HELP = ("which weights of a training run (folder, model.safetensors or checkpoint.pt) to use: its EMA weights "
        "(default: what diffusion models are sampled and evaluated with) or its raw final weights; a file without "
        "an EMA copy is used as saved (refused with --weights ema). The choice is printed and recorded in --out")


def add_weights_flag(p: argparse.ArgumentParser) -> None:
    """Add ``--weights {ema,raw}`` (default None: EMA where the file holds it, see ``gradconflict._loading``)."""
    p.add_argument("--weights", choices=["ema", "raw"], default=None, help=HELP)


def report_weights(command: str, kind: str, where: str) -> None:
    """Print which weights ``command`` used (one line on stderr)."""
    print(f"gradconflict {command}: weights: {describe_weights(kind, where)}", file=sys.stderr)


def _record(stamp: Path, keys: tuple[str, ...]) -> Optional[dict[str, Any]]:
    """The dict at ``keys`` inside the identity recorded at ``stamp`` (None when there is none)."""
    if not stamp.is_file():
        return None
    node: Any = json.loads(stamp.read_text())
    for key in keys:
        node = node.get(key) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else None


def weights_for_folder(stamp: Path, keys: tuple[str, ...], requested: Optional[str], old: str) -> Optional[str]:
    """The ``weights`` to load with: ``requested``; without it, in a folder that holds results (``stamp``, the
    identity dict at ``keys``), the weights recorded there (``old``, the weights it was computed with, for a
    record that predates ``--weights``), so that the same command resumes it; else None (the default, EMA)."""
    recorded = _record(stamp, keys)
    if requested is None and recorded is not None:
        held = recorded.get("weights", old)
        return held if held in ("ema", "raw") else None
    return requested


def record_legacy_weights(stamp: Path, keys: tuple[str, ...], kind: str, old: str) -> None:
    """Write into a record that predates ``--weights`` the weights it was computed with (``old`` where the file
    holds both EMA and raw weights, else ``kind``, its only set), so that the identity check compares them."""
    recorded = _record(stamp, keys)
    if recorded is None or "weights" in recorded:
        return
    whole = json.loads(stamp.read_text())
    node = whole
    for key in keys:
        node = node[key]
    node["weights"] = old if kind in ("ema", "raw") else kind
    write_json(stamp, whole)
    print(f"note: {stamp.parent} was recorded before --weights existed; it used the {node['weights']} weights, "
          "now recorded", file=sys.stderr)
