"""Helpers of ``gradconflict.spec``: one-line errors for user code and unreadable files, run folders given as a
checkpoint, and the EMA / raw weights rule.

The weights rule (one default everywhere): a file that holds both an EMA copy and the raw weights (a run folder,
its ``model.safetensors`` or ``checkpoint.pt``, any ``.safetensors`` with ``ema.*`` keys) gives its **EMA**
weights unless ``weights="raw"``; a file without an EMA copy gives its raw weights (with a note, or a refusal when
``weights="ema"`` was asked for); a plain state dict or a diffusers folder holds one set of weights, used as saved.
"""

from __future__ import annotations

import contextlib
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

__all__ = ["WEIGHTS", "DEFAULT_WEIGHTS", "check_weights", "call_user", "run_weights_file", "read_safetensors",
           "describe_weights", "resolve_checkpoint", "load_weights", "load_trained_weights"]

WEIGHTS = ("ema", "raw")
DEFAULT_WEIGHTS = "ema"  # what diffusion users sample and evaluate with


def check_weights(weights: Optional[str]) -> None:
    """Raise ``ValueError`` for a ``weights`` other than None, "ema" or "raw"."""
    if weights is not None and weights not in WEIGHTS:
        raise ValueError(f"unknown weights {weights!r}: use 'ema' or 'raw' (or None for the default, EMA)")


def describe_weights(kind: str, where: str) -> str:
    """The one line a command prints on which weights it used."""
    return {"ema": f"the EMA weights of {where} (--weights raw for the raw final weights)",
            "raw": f"the raw weights of {where}",
            "as saved": f"the weights of {where} as saved (it holds no separate EMA copy)",
            "init": f"the initial weights of {where} (no trained weights loaded)"}[kind]


def _user_frame(err: BaseException, user_file: Optional[Path]) -> Optional[tuple[str, int]]:
    """``(file, line)`` where ``err`` happened in the user's code: the last frame in ``user_file`` (or, for a
    ``SyntaxError``, the line it names), else the last frame outside Python's import machinery."""
    if isinstance(err, SyntaxError) and err.filename:
        return err.filename, int(err.lineno or 0)
    frames = traceback.extract_tb(err.__traceback__)
    if user_file is not None:
        mine = [f for f in frames if Path(f.filename).resolve() == user_file]
        if mine:
            return mine[-1].filename, int(mine[-1].lineno or 0)
    others = [f for f in frames if not f.filename.startswith("<frozen") and "gradconflict" not in Path(f.filename).parts]
    return (others[-1].filename, int(others[-1].lineno or 0)) if others else None


def _shown(filename: str, user_file: Optional[Path], as_given: str) -> str:
    return as_given if user_file is not None and Path(filename).resolve() == user_file else filename


@contextlib.contextmanager
def call_user(spec: str, what: str, user_file: Optional[Path] = None, as_given: str = "") -> Iterator[None]:
    """Turn an exception raised by the user's code (importing a spec's file or calling its function) into a
    one-line ``ValueError`` naming the spec, what failed, the user's file and line and the error; a
    ``sys.exit(n)`` there into a ``ValueError`` saying so (KeyboardInterrupt passes through)."""
    try:
        yield
    except KeyboardInterrupt:
        raise
    except SystemExit as exc:
        raise ValueError(f"model spec {spec} called sys.exit({exc.code!r}) while loading ({what}); a build "
                         "function must return the model, or raise an error saying what is wrong") from None
    except BaseException as exc:  # noqa: BLE001 - anything the user's code raises is reported in one line
        where = _user_frame(exc, user_file)
        at = f" at {_shown(where[0], user_file, as_given)} line {where[1]}" if where else ""
        detail = str(exc).splitlines()[0] if str(exc).strip() else ""
        if isinstance(exc, SyntaxError):
            detail = exc.msg
        hint = "; install what it imports" if isinstance(exc, ModuleNotFoundError) else ""
        raise ValueError(f"model spec {spec} failed{at} ({what}): {type(exc).__name__}"
                         f"{': ' + detail[:200] if detail else ''}{hint}") from exc


def read_safetensors(path: Path, read: Callable[[], Any]) -> Any:
    """``read()`` of the ``.safetensors`` file ``path``, with a truncated or corrupt file reported in one line."""
    try:
        return read()
    except Exception as exc:  # noqa: BLE001 - SafetensorError and OS errors alike
        raise ValueError(f"cannot read {str(path)!r}: it is not a complete .safetensors file "
                         f"({str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__}; truncated by an "
                         "interrupted copy or download?); copy or save it again") from None


def _refuse_folder(path: Path) -> None:
    found = run_weights_file(path)
    if found is not None:
        raise ValueError(f"checkpoint {str(path)!r} is a training run folder, not a weights file: pass its "
                         f"{found.name} ({found}), or the folder itself as the model (--model {path})")
    raise ValueError(f"checkpoint {str(path)!r} is a folder, not a weights file: pass the state dict file "
                     "(.pt or .safetensors) inside it")


def resolve_checkpoint(path: str | Path, verbose: bool = False) -> Path:
    """``path``, or the weights file of the training run folder ``path`` (``model.safetensors``, else
    ``checkpoint.pt``); another folder raises ``ValueError`` naming what to pass."""
    path = Path(path)
    if path.is_dir():
        found = run_weights_file(path)
        if found is None:
            _refuse_folder(path)
        if verbose:
            print(f"gradconflict: checkpoint {str(path)!r} is a training run folder: using its {found.name}",
                  file=sys.stderr)
        return found
    return path


def run_weights_file(path: Path) -> Optional[Path]:
    """The weights file of a training run folder (``model.safetensors``, else ``checkpoint.pt``), else None."""
    for name in ("model.safetensors", "checkpoint.pt"):
        if (path / name).is_file():
            return path / name
    return None


def _no_ema(path: Path, weights: Optional[str]) -> None:
    if weights == "ema":
        raise ValueError(f"{str(path)!r} holds no EMA weights (one set only): leave out --weights ema (its weights "
                         "are then used as saved), or pass a file with an EMA copy (a gradconflict run's "
                         "model.safetensors or checkpoint.pt)")


def load_trained_weights(path: str | Path, weights: Optional[str], device: Any = "cpu") -> tuple[Any, Any, str, str]:
    """``(model, schedule, prediction, kind)`` of a training run folder or file by the weights rule (module
    docstring): ``kind`` is "ema" or "raw", the weights loaded."""
    from .train.checkpoint import NoEMAWeights, load_trained

    check_weights(weights)
    kind = weights or DEFAULT_WEIGHTS
    try:
        return (*load_trained(path, ema=kind == "ema", device=device), kind)
    except NoEMAWeights:
        _no_ema(Path(path), weights)
        return (*load_trained(path, ema=False, device=device), "raw")


def load_weights(path: str | Path, weights: Optional[str], verbose: bool = False) -> tuple[dict[str, Any], str]:
    """``(state dict, kind)`` of a checkpoint file by the weights rule (module docstring): ``kind`` is "ema" or
    "raw" for a file with an EMA copy (``ema.*`` keys of a ``.safetensors``, a ``gradconflict train``
    ``checkpoint.pt``), "as saved" for any other state dict."""
    import torch

    from .spec import load_state_dict
    from .train.checkpoint import CHECKPOINT_FORMAT, EMA_PREFIX

    check_weights(weights)
    path = Path(path)
    kind = weights or DEFAULT_WEIGHTS
    if path.suffix == ".safetensors" and path.is_file():
        from safetensors.torch import load_file

        state = read_safetensors(path, lambda: load_file(str(path)))
        ema = {k[len(EMA_PREFIX):]: v for k, v in state.items() if k.startswith(EMA_PREFIX)}
        raw = {k: v for k, v in state.items() if not k.startswith(EMA_PREFIX)}
        if ema:
            return (ema if kind == "ema" else raw), kind
        _no_ema(path, weights)
        return raw, "as saved"
    if path.is_file():
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # noqa: BLE001 - load_state_dict reports an unreadable file
            obj = None
        if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT and isinstance(obj.get("ema"), dict):
            chosen = obj["ema"]["shadow"] if kind == "ema" else obj["model"]
            return {k: v.clone() for k, v in chosen.items()}, kind  # clone: no tensor keeps the mmap open
    state = load_state_dict(path, verbose)
    _no_ema(path, weights)
    return state, "as saved"
