"""Weights files: state dicts (``.pt`` / ``.safetensors``), run folders given as a checkpoint, the EMA / raw weights
rule, and loading a checkpoint into a model (shapes and finite values checked, DDP / torch.compile key prefixes
removed), with unreadable files reported in one line.

The weights rule (one default everywhere): a file that holds both an EMA copy and the raw weights (a run folder,
its ``model.safetensors`` or ``checkpoint.pt``, any ``.safetensors`` with ``ema.*`` keys) gives its **EMA**
weights unless ``weights="raw"``; a file without an EMA copy gives its raw weights (with a note, or a refusal when
``weights="ema"`` was asked for); a plain state dict or a diffusers folder holds one set of weights, used as saved.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from .adapters.user_code import call_user  # noqa: F401 - re-exported: it lived here

__all__ = ["WEIGHTS", "DEFAULT_WEIGHTS", "check_weights", "call_user", "run_weights_file", "read_safetensors",
           "describe_weights", "resolve_checkpoint", "load_weights", "load_trained_weights", "load_state_dict",
           "load_checkpoint_into"]

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


def load_state_dict(path: str | Path, verbose: bool = False) -> dict[str, Any]:
    """A state dict from ``.safetensors`` or a torch file (a bare state dict or one under ``model``/``state_dict``)."""
    path = Path(path)
    if path.is_dir():
        _refuse_folder(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = read_safetensors(path, lambda: load_file(str(path)))
        if any(k.startswith("ema.") for k in state):  # gradconflict runs keep EMA weights beside the model
            state = {k: v for k, v in state.items() if not k.startswith("ema.")}
        return state
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - report any unreadable file the same way
        if "Weights only load failed" in str(err) and "Unsupported global" in str(err):
            raise ValueError(
                f"checkpoint {str(path)!r} holds pickled Python objects besides tensors ({_first_global(err)}), which "
                "are not unpickled here (unpickling runs code); save the weights alone, e.g. "
                "torch.save(model.state_dict(), 'weights.pt'), or load the file in your own build function"
            ) from None
        raise ValueError(f"cannot read checkpoint {str(path)!r}: it is not a torch (.pt) or .safetensors file that "
                         f"this torch can load ({_cause(err)})") from None
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state_dict"):
            if key in obj and isinstance(obj[key], dict):
                others = [k for k, v in obj.items() if k != key and isinstance(v, dict) and _is_weights(v)]
                if others and verbose:
                    print(f"gradconflict: {str(path)!r}: using its {key!r} weights; it also holds {others} (to "
                          "analyse those, save them alone)", file=sys.stderr)
                obj = obj[key]
                break
    if not isinstance(obj, dict):
        raise ValueError(f"{str(path)!r} does not hold a state dict")
    return obj


def _is_weights(obj: dict) -> bool:
    return bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _cause(err: Exception) -> str:
    """The line of a torch.load error that names what was wrong (not its weights_only advice)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if "Weights only load failed" in str(err):
        lines = [line for line in lines if not line.startswith(("Weights only", "Please file", "Check the doc"))]
    return (lines[0] if lines else type(err).__name__)[:160]


def _first_global(err: Exception) -> str:
    match = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
    return match.group(1) if match else "non-tensor objects"


_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel / DataParallel, torch.compile


def _strip_wrappers(model: Any, state: dict[str, Any], checkpoint: str | Path,
                    verbose: bool) -> dict[str, Any]:
    """``state`` without a ``module.`` / ``_orig_mod.`` prefix that every key has and the model's keys do not."""
    names = set(model.state_dict())
    stripped = []
    for prefix in _WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state) and not any(k.startswith(prefix) for k in names):
            state = {k[len(prefix):]: v for k, v in state.items()}
            stripped.append(prefix)
    if stripped and verbose:
        print(f"gradconflict: {str(checkpoint)!r}: removed the key prefix {' and '.join(stripped)} (a DDP or "
              "torch.compile wrapper)", file=sys.stderr)
    return state


def _check_finite_weights(model: Any, state: dict[str, Any], checkpoint: str | Path) -> None:
    """Refuse NaN / Inf in the checkpoint's parameters (buffers may hold -inf on purpose: attention masks)."""
    params = {name for name, _ in model.named_parameters()}
    bad = [k for k, v in state.items() if (k in params or f"model.{k}" in params) and isinstance(v, torch.Tensor)
           and v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"checkpoint {str(checkpoint)!r} holds NaN or Inf in {len(bad)} tensor(s), e.g. {bad[:3]}: "
                         "these weights are broken (a diverged run?); pass an earlier checkpoint")


def load_checkpoint_into(model: Any, checkpoint: str | Path, weights: Optional[str], verbose: bool = False) -> str:
    """Load the state dict of ``checkpoint`` (by the weights rule) into ``model``, all keys matching; returns which
    weights were loaded ("ema", "raw" or "as saved"). Wrapper key prefixes are removed; NaN / Inf parameters and
    shape mismatches raise ``ValueError`` naming the tensors."""
    state, kind = load_weights(checkpoint, weights, verbose)
    state = _strip_wrappers(model, state, checkpoint, verbose)
    _check_finite_weights(model, state, checkpoint)
    _check_shapes(model, state, checkpoint)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {str(checkpoint)!r} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return kind


def _check_shapes(model: Any, state: dict[str, Any], checkpoint: str | Path) -> None:
    """Raise ``ValueError`` naming the first tensors of ``state`` whose shapes differ from ``model``'s."""
    reference = model.state_dict()
    bad = []
    for key, value in state.items():
        for name in (key, f"model.{key}"):  # DiffusersModel accepts keys without its "model." prefix
            if name in reference and hasattr(value, "shape") and tuple(reference[name].shape) != tuple(value.shape):
                bad.append(f"{key} {tuple(value.shape)} vs {tuple(reference[name].shape)}")
                break
    if bad:
        raise ValueError(
            f"checkpoint {str(checkpoint)!r} does not fit the model: {len(bad)} tensor shape(s) differ "
            f"(checkpoint vs model), e.g. {'; '.join(bad[:3])}; it was written for another model or model config: "
            "pass the model (or training run folder) that wrote it"
        )
