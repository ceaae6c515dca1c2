"""Resolve a model spec into ``(model, schedule, prediction)``: a built-in name, a training run, or user code.

A spec is one of

* a built-in model name (``gradconflict.models.MODEL_NAMES``, e.g. ``dit-tiny``): a fresh model (initialised under
  ``BUILTIN_INIT_SEED``, so every run gets the same weights) with the
  linear schedule (T = 1000) and the prediction type of its config;
* a training run directory (written by ``gradconflict train``): its EMA weights (``weights="raw"``: its raw
  final weights), schedule and prediction;
* ``path/to/file.py:function`` or ``package.module:function``: a function returning ``(model, schedule,
  prediction)``, or just a model (then the linear schedule and eps prediction are assumed); it is called with
  torch's random generator seeded (``seed``, default ``BUILTIN_INIT_SEED``), so its initial weights are the same
  in every run. An error in that code is reported in one line naming its file and line.
* ``diffusers:PATH``: a diffusers UNet2DModel / DiTTransformer2DModel / Transformer2DModel and its scheduler
  from a local pipeline or model folder (``gradconflict.adapters.load_diffusers``; needs ``pip install
  gradconflict[diffusers]``, never downloads).

``checkpoint`` (a state dict in ``.pt`` or ``.safetensors``, or a training run folder: its weights file) is
loaded into the model afterwards. A checkpoint written by ``gradconflict train`` (``checkpoint.pt`` or
``model.safetensors`` of a run) given with a built-in name also brings its run's model config, schedule and
prediction; what differs from the name's defaults is reported in one line on stderr.

Which weights (``weights``, the CLI's ``--weights``): a file holding an EMA copy beside the raw weights (a
gradconflict run) gives its EMA weights by default, its raw ones with ``weights="raw"``; see
``gradconflict._loading``. ``LoadedModel.weights`` says which were used.

Where each part lives (every name is re-exported here, so ``from gradconflict.spec import X`` keeps working):

* ``gradconflict.adapters.loaded``: ``LoadedModel``;
* ``gradconflict.adapters.builtin``: built-in names and training checkpoints given with them;
* ``gradconflict.adapters.user_code``: ``file.py:function`` specs and one-line errors in user code;
* ``gradconflict.adapters.diffusers``: ``diffusers:PATH``;
* ``gradconflict.adapters.inputs``: the model's input size, channels and labels, and data read at that size;
* ``gradconflict._loading``: weights files and the EMA / raw rule.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from ._loading import (_WRAPPER_PREFIXES, _cause, _check_finite_weights, _check_shapes,  # noqa: F401 - re-exported
                       _first_global, _is_weights, _refuse_folder, _strip_wrappers, call_user, load_checkpoint_into,
                       load_state_dict, resolve_checkpoint)
from .adapters.builtin import BUILTIN_INIT_SEED, load_builtin  # noqa: F401 - re-exported
from .adapters.builtin import load_training_checkpoint as _load_training_checkpoint  # noqa: F401
from .adapters.builtin import training_config as _training_config  # noqa: F401
from .adapters.inputs import (UNKNOWN_SIZE, _field, _hw, conditional, forward_hint, model_data,  # noqa: F401
                              model_input, model_shape)
from .adapters.loaded import LoadedModel
from .adapters.user_code import _on_path, load_user_function  # noqa: F401 - re-exported
from .adapters.user_code import import_function as _import_function  # noqa: F401
from .engine.checks import first_line  # noqa: F401 - re-exported: it was importable from here
from .schedule import NoiseSchedule  # noqa: F401 - re-exported
from .targets import normalize_prediction

__all__ = ["LoadedModel", "load_model", "load_state_dict", "model_input", "model_data", "spec_identity", "BUILTIN_INIT_SEED",
           "conditional", "forward_hint", "resolve_checkpoint", "model_shape"]


def spec_identity(spec: str) -> str:
    """A model spec as recorded with results: ``file.py:function`` with the file's absolute path (the same file
    given relative or absolute is the same spec), anything else as it is."""
    target, sep, func = str(spec).rpartition(":")
    if sep and target.endswith(".py") and not str(spec).startswith("diffusers:"):
        return f"{Path(target).resolve()}:{func}"
    return str(spec)


def load_model(spec: str, checkpoint: Optional[str | Path] = None, *, device: str | torch.device = "cpu",
               verbose: bool = True, weights: Optional[str] = None, seed: Optional[int] = None) -> LoadedModel:
    """Resolve a model spec (see the module docstring) and optionally load a checkpoint into it.

    ``verbose``: print the one-line note when a training checkpoint overrides a built-in name's defaults.
    ``weights``: "ema" or "raw" weights of a file that holds both (None: EMA, the default; see the module
    docstring). ``seed``: torch's seed while a user's build function runs (None: ``BUILTIN_INIT_SEED``).
    """
    from ._loading import check_weights, load_trained_weights

    check_weights(weights)
    if checkpoint is not None:
        checkpoint = resolve_checkpoint(checkpoint, verbose)
    text = str(spec)
    from_run = False  # the checkpoint was a training file given with a built-in name: already loaded
    if text.startswith("diffusers:"):
        from .adapters.diffusers import load_diffusers

        loaded = load_diffusers(text[len("diffusers:"):], device=device)
        loaded.weights = "as saved"
    elif Path(text).is_dir():
        model, schedule, prediction, kind = load_trained_weights(text, weights)
        loaded = LoadedModel(model, schedule, normalize_prediction(prediction), f"run {text}", kind)
    elif ":" in text and not Path(text).exists():
        loaded = load_user_function(text, BUILTIN_INIT_SEED if seed is None else seed, verbose)
    else:
        loaded = load_builtin(text, checkpoint, verbose, weights)
        from_run = loaded.weights != "init"
    if checkpoint is not None and not from_run:
        loaded.weights = load_checkpoint_into(loaded.model, checkpoint, weights, verbose)
    if weights is not None and loaded.weights == "init":
        raise ValueError(f"--weights {weights}: {text} has no trained weights to choose from (no checkpoint, not a "
                         "training run folder); drop --weights, or pass --checkpoint FILE")
    loaded.model.to(device)
    return loaded
