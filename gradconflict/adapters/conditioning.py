"""Per-sample conditioning: the tensors a model takes besides ``(x_t, t, y)``, how they are batched, what "null" is.

A data file may carry any per-sample conditioning tensors by name (first dimension N, one row per image); they
are passed to the model as keyword arguments of the same name, row ``i`` with image ``i``:

* ``encoder_hidden_states`` (N, L, D): text embeddings for cross-attention (a diffusers UNet2DConditionModel or
  a text-conditioned Transformer2DModel);
* ``encoder_attention_mask`` (N, L): 1 = attend to that token, 0 = ignore it;
* ``added_cond_kwargs.NAME`` (N, ...): passed inside ``added_cond_kwargs={NAME: ...}`` (e.g. SDXL's
  ``added_cond_kwargs.text_embeds`` and ``added_cond_kwargs.time_ids``); see :func:`nest`;
* any other name the model's ``forward`` takes.

Class labels are not conditioning here: ``labels`` (alias ``class_labels``) stay ``ImageDataset.labels`` and
go to the model as ``y``. A model may declare the names it takes as ``conditioning_keys`` (a tuple; the
diffusers adapter does); otherwise its ``forward`` signature decides. This module imports nothing heavy.
"""

from __future__ import annotations

import inspect
from typing import Any, Mapping, Optional

import torch

__all__ = ["LABELS_ARG", "LABEL_KEYS", "NESTED", "check_conditioning", "select_rows", "nest", "accepted_keys", "check_accepted",
           "null_text_conditioning",
           "model_conditioning", "NULL_LENGTH"]

LABELS_ARG = "y"
"""The keyword under which a model takes its class labels (built-in models and ``file.py:build`` models:
``model(x_t, t, y=labels, **conditioning)``; the diffusers adapter maps it to ``class_labels``)."""

LABEL_KEYS: tuple[str, ...] = ("labels", "class_labels")
"""Data-file keys read as class labels (``ImageDataset.labels``, the model's ``y``), not as conditioning."""

NESTED: tuple[str, ...] = ("added_cond_kwargs",)
"""Keyword arguments that take a dict: a data key ``"added_cond_kwargs.NAME"`` becomes ``added_cond_kwargs[NAME]``."""


def check_conditioning(conditioning: Mapping[str, Any], n: int, source: str) -> dict[str, torch.Tensor]:
    """Per-sample tensors ``{name: (n, ...)}`` from ``conditioning``; raises ``ValueError`` naming a key whose
    first dimension is not ``n`` (one row per image), or that is not numeric."""
    out: dict[str, torch.Tensor] = {}
    for key, value in conditioning.items():
        tensor = value if isinstance(value, torch.Tensor) else None
        if tensor is None:
            try:
                tensor = torch.from_numpy(_numeric(value, key, source).copy())
            except TypeError:
                raise ValueError(f"{source}: conditioning {key!r} has dtype {getattr(value, 'dtype', type(value))}; "
                                 "store numbers (e.g. arr.astype(np.float32)) or remove the key") from None
        if tensor.ndim == 0 or tensor.shape[0] != n:
            raise ValueError(f"{source}: conditioning {key!r} has shape {tuple(tensor.shape)} but there are {n} images: "
                             f"its first dimension must be {n} (one row per image); fix or remove {key!r}")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{source}: conditioning {key!r} contains NaN or Inf; replace those entries")
        out[key] = tensor
    return out


def _numeric(value: Any, key: str, source: str) -> Any:
    import numpy as np

    arr = np.asarray(value)
    if arr.dtype.kind not in "biuf":
        raise TypeError(key)
    return arr


def select_rows(conditioning: Optional[Mapping[str, torch.Tensor]], index: Any) -> dict[str, torch.Tensor]:
    """``{name: tensor[index]}``: the conditioning of the chosen samples (rows stay aligned with the images)."""
    return {k: v[index] for k, v in (conditioning or {}).items()}


def nest(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Flat keyword arguments -> the model's: ``{"added_cond_kwargs.text_embeds": e}`` becomes
    ``{"added_cond_kwargs": {"text_embeds": e}}``; other keys are kept."""
    out: dict[str, Any] = {}
    for key, value in kwargs.items():
        outer, dot, inner = key.partition(".")
        if dot and outer in NESTED:
            out.setdefault(outer, {})[inner] = value
        else:
            out[key] = value
    return out


def accepted_keys(model: Any) -> Optional[tuple[str, ...]]:
    """The conditioning names ``model`` takes: its ``conditioning_keys`` when it declares them, else the keyword
    parameters of its ``forward`` besides x_t, t and y; None when it takes ``**kwargs`` (any name)."""
    declared = getattr(model, "conditioning_keys", None)
    if declared is not None:
        return tuple(declared)
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError, AttributeError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    named = [p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    return tuple(name for name in named[2:] if name != LABELS_ARG)


def check_accepted(model: Any, keys: Any, data_name: str) -> None:
    """Refuse conditioning names that ``model`` does not take (they would never reach it, or crash its forward)."""
    allowed = accepted_keys(model)
    if allowed is None:
        return
    extra = [k for k in keys if k.partition(".")[0] not in allowed]
    if extra:
        takes = f"it takes {list(allowed)}" if allowed else "it takes no conditioning"
        raise ValueError(f"{data_name!r} carries the conditioning {extra} but the model does not take it ({takes}): "
                         "remove those arrays from the data file or use a model that takes them")


def null_text_conditioning(n: int, length: int, dim: int, given: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``encoder_hidden_states`` for an unconditional run, ``(n, length, dim)``: zeros, or ``given`` ((L, D) or
    (1, L, D), e.g. the embedding of the empty prompt) repeated for every sample (an expanded view, no copy)."""
    if given is None:
        if length < 1:
            raise ValueError(f"the null text length must be >= 1 token, got {length}")
        return torch.zeros(1, length, dim).expand(n, length, dim)
    given = torch.as_tensor(given)
    if given.ndim == 3 and given.shape[0] == 1:
        given = given[0]
    if given.ndim != 2 or (dim and given.shape[1] != dim):
        raise ValueError(f"the null conditioning has shape {tuple(given.shape)}; expected (L, {dim}) or (1, L, {dim}) "
                         f"(the model's cross_attention_dim is {dim})")
    return given.float()[None].expand(n, *given.shape)


NULL_LENGTH = 77
"""Default token count L of ``--null-conditioning`` zeros (CLIP's context length, as in Stable Diffusion)."""


def model_conditioning(model: Any, dataset: Any, null: Optional[str] = None, null_length: int = NULL_LENGTH,
                       ) -> dict[str, torch.Tensor]:
    """The per-sample conditioning ``{name: (N, ...)}`` to pass to ``model`` with ``dataset``'s images.

    ``dataset.conditioning`` (from the data file), checked against the names the model takes; with ``null``
    (``--null-conditioning``): ``"zeros"`` gives ``encoder_hidden_states`` of zeros ``(N, null_length, D)``
    (D: the model's ``config.cross_attention_dim``), a ``.npy`` path an embedding (L, D) for every sample."""
    conditioning = dict(getattr(dataset, "conditioning", None) or {})
    name = getattr(dataset, "name", "the data")
    check_accepted(model, conditioning, name)
    if null is None:
        return conditioning
    if "encoder_hidden_states" in conditioning:
        raise ValueError(f"{name!r} carries encoder_hidden_states and --null-conditioning replaces them: give one of them")
    dim = getattr(getattr(model, "config", None), "cross_attention_dim", None)
    if not dim:
        raise ValueError("--null-conditioning: the model has no cross-attention (no text conditioning) to run "
                         "unconditionally; drop --null-conditioning")
    given = None
    if null != "zeros":
        import numpy as np

        try:
            given = torch.from_numpy(np.load(null, allow_pickle=False))
        except (OSError, ValueError) as err:
            raise ValueError(f"--null-conditioning {null}: cannot read it ({err}); pass 'zeros' or a .npy (L, {dim})") from None
    conditioning["encoder_hidden_states"] = null_text_conditioning(len(dataset), null_length, int(dim), given)
    return conditioning
