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
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import json
import re
from collections.abc import Mapping
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.nn as nn

from ._loading import _refuse_folder, call_user, resolve_checkpoint
from .engine.checks import first_line
from .schedule import NoiseSchedule
from .targets import normalize_prediction

__all__ = ["LoadedModel", "load_model", "load_state_dict", "model_input", "model_data", "spec_identity", "BUILTIN_INIT_SEED",
           "conditional", "forward_hint", "resolve_checkpoint", "model_shape"]

BUILTIN_INIT_SEED = 0  # a built-in name is initialised under this seed: every run gets the same weights


@dataclass
class LoadedModel:
    """A model with the noise schedule and prediction type it was trained with."""

    model: nn.Module
    schedule: NoiseSchedule
    prediction: str
    source: str
    weights: str = "init"  # "ema", "raw", "as saved" (a file without an EMA copy) or "init" (no weights loaded)


def load_state_dict(path: str | Path, verbose: bool = False) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch file (a bare state dict or one under ``model``/``state_dict``)."""
    path = Path(path)
    if path.is_dir():
        _refuse_folder(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        from ._loading import read_safetensors

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


def _strip_wrappers(model: nn.Module, state: dict[str, torch.Tensor], checkpoint: str | Path,
                    verbose: bool) -> dict[str, torch.Tensor]:
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


def _check_finite_weights(model: nn.Module, state: dict[str, torch.Tensor], checkpoint: str | Path) -> None:
    """Refuse NaN / Inf in the checkpoint's parameters (buffers may hold -inf on purpose: attention masks)."""
    params = {name for name, _ in model.named_parameters()}
    bad = [k for k, v in state.items() if (k in params or f"model.{k}" in params) and isinstance(v, torch.Tensor)
           and v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"checkpoint {str(checkpoint)!r} holds NaN or Inf in {len(bad)} tensor(s), e.g. {bad[:3]}: "
                         "these weights are broken (a diverged run?); pass an earlier checkpoint")


def _training_config(path: str | Path) -> Optional[dict[str, Any]]:
    """The ``TrainConfig`` dict stored in a ``gradconflict train`` checkpoint or weights file, else None."""
    path = Path(path)
    if not path.is_file():
        return None  # load_state_dict reports the missing file
    try:
        if path.suffix == ".safetensors":
            from .train.checkpoint import weights_metadata

            meta = weights_metadata(path)
            return json.loads(meta["config"]) if "config" in meta and "model_spec" in meta else None
        from .train.checkpoint import CHECKPOINT_FORMAT

        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # mmap: no copy of the tensors
    except Exception:  # noqa: BLE001 - not a training file; load_state_dict reads (or rejects) it as a state dict
        return None
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT and isinstance(obj.get("config"), dict):
        return obj["config"]
    return None


def _load_training_checkpoint(name: str, checkpoint: str | Path, config: dict[str, Any], verbose: bool,
                              weights: Optional[str] = None) -> LoadedModel:
    """Built-in ``name`` with the model config, schedule, prediction and weights (EMA by default) of a training
    checkpoint."""
    from ._loading import load_trained_weights
    from .models import build_model, model_spec
    from .train.config import TrainConfig

    cfg = TrainConfig.from_dict(config)
    with torch.device("meta"):  # the name's defaults, without allocating or initialising weights
        default = model_spec(build_model(name))
    model, schedule, prediction, kind = load_trained_weights(checkpoint, weights)
    stored = model_spec(model)
    if stored["arch"] != default["arch"]:
        raise ValueError(
            f"checkpoint {str(checkpoint)!r} holds a {stored['arch']} model (trained as {cfg.model!r}), not a "
            f"{default['arch']} like {name!r}: pass --model {cfg.model} or the run folder"
        )
    prediction = normalize_prediction(prediction)
    changes = []
    if prediction != normalize_prediction(default["config"].get("prediction", "eps")):
        changes.append(f"prediction {prediction!r}")
    if (cfg.schedule, cfg.T) != ("linear", 1000):
        changes.append(f"{cfg.schedule} schedule (T = {cfg.T})")
    fields = [f"{k}={v}" for k, v in stored["config"].items() if k != "prediction" and default["config"].get(k) != v]
    if fields:
        changes.append("model config " + ", ".join(fields))
    if changes and verbose:
        print(f"gradconflict: {str(checkpoint)!r} was trained with {'; '.join(changes)}: using these instead of "
              f"the {name} defaults", file=sys.stderr)
    return LoadedModel(model, schedule, prediction, f"{name} {checkpoint}", kind)


def _check_shapes(model: nn.Module, state: dict[str, torch.Tensor], checkpoint: str | Path) -> None:
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


def _import_function(spec: str) -> Any:
    target, _, func = spec.rpartition(":")
    if not target or not func:
        raise ValueError(f"model spec {spec!r} must look like 'path/file.py:function' or 'module:function'")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise FileNotFoundError(f"model file {target!r} does not exist")
        _on_path(path.resolve().parent)  # as `python file.py` would: the file's own imports resolve beside it
        name = f"gradconflict_user_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        try:
            with call_user(spec, f"importing {target}", path.resolve(), target):
                module_spec.loader.exec_module(module)
        except ValueError:
            sys.modules.pop(name, None)
            raise
    else:
        _on_path(Path.cwd())  # as `python -m` would: a module in the current folder is found
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as exc:
            if exc.name is not None and not target.startswith(exc.name):  # it exists, but one of its imports does not
                raise ValueError(f"model spec {spec!r}: importing {target!r} failed: {exc}; install what it "
                                 "imports") from None
            raise ValueError(f"model spec {spec!r}: cannot import {target!r} ({exc}); run from the folder that holds "
                             f"it, install its package, or pass 'path/to/file.py:{func}'") from None
        except (Exception, SystemExit):  # noqa: BLE001 - an error in the module's own code: one line, its file and line
            with call_user(spec, f"importing {target}"):
                raise
    if not hasattr(module, func):
        raise ValueError(f"{target!r} has no function {func!r}")
    return getattr(module, func)


def _on_path(folder: Path) -> None:
    """Put ``folder`` on ``sys.path`` (last, so that it never shadows an installed package)."""
    if str(folder) not in sys.path:
        sys.path.append(str(folder))


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
    from ._loading import check_weights, load_trained_weights, load_weights

    check_weights(weights)
    if checkpoint is not None:
        checkpoint = resolve_checkpoint(checkpoint, verbose)
    text = str(spec)
    loaded: Optional[LoadedModel] = None
    run_config: Optional[dict[str, Any]] = None
    if text.startswith("diffusers:"):
        from .adapters.diffusers import load_diffusers

        loaded = load_diffusers(text[len("diffusers:"):], device=device)
        loaded.weights = "as saved"
    elif Path(text).is_dir():
        model, schedule, prediction, kind = load_trained_weights(text, weights)
        loaded = LoadedModel(model, schedule, normalize_prediction(prediction), f"run {text}", kind)
    elif ":" in text and not Path(text).exists():
        build = _import_function(text)
        with torch.random.fork_rng(devices=[]):  # the same initial weights in every run; global RNG untouched
            torch.manual_seed(BUILTIN_INIT_SEED if seed is None else seed)
            target = text.rpartition(":")[0]
            user_file = Path(target).resolve() if target.endswith(".py") else None
            with call_user(text, f"calling {text.rpartition(':')[2]}()", user_file, target):
                made = build()
        if isinstance(made, nn.Module):
            if verbose:
                print(f"note: {text} returned a model alone, so the linear schedule (T = 1000) and eps prediction "
                      "are assumed; return (model, schedule, prediction) if it was trained otherwise", file=sys.stderr)
            loaded = LoadedModel(made, NoiseSchedule.linear(), "eps", text)
        elif isinstance(made, (tuple, list)) and len(made) == 3:
            model, schedule, prediction = made
            if not isinstance(model, nn.Module):
                raise ValueError(f"{text!r} returned a {type(model).__name__} as its model; return the "
                                 "torch.nn.Module (a plain function has no parameters to take gradients of)")
            if not isinstance(schedule, NoiseSchedule):
                schedule = NoiseSchedule.from_diffusers(schedule)
            loaded = LoadedModel(model, schedule, normalize_prediction(prediction), text)
        else:
            got = f"a {type(made).__name__} of {len(made)} items" if isinstance(made, (tuple, list)) else \
                f"a {type(made).__name__}"
            raise ValueError(f"{text!r} must return an nn.Module or (model, schedule, prediction), got {got}")
    else:
        from .models import MODEL_NAMES, build_model

        if text not in MODEL_NAMES:
            raise ValueError(
                f"unknown model {text!r}: use a built-in name {list(MODEL_NAMES)}, a training run directory, "
                "or 'path/file.py:function'"
            )
        run_config = _training_config(checkpoint) if checkpoint is not None else None
        if run_config is not None:
            loaded = _load_training_checkpoint(text, checkpoint, run_config, verbose, weights)
        else:
            with torch.random.fork_rng(devices=[]):  # the same initial weights in every run; global RNG untouched
                torch.manual_seed(BUILTIN_INIT_SEED)
                model = build_model(text)
            prediction = getattr(getattr(model, "config", None), "prediction", "eps")
            loaded = LoadedModel(model, NoiseSchedule.linear(), normalize_prediction(prediction), text)
    if checkpoint is not None and run_config is None:
        state, loaded.weights = load_weights(checkpoint, weights, verbose)
        state = _strip_wrappers(loaded.model, state, checkpoint, verbose)
        _check_finite_weights(loaded.model, state, checkpoint)
        _check_shapes(loaded.model, state, checkpoint)
        missing, unexpected = loaded.model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"checkpoint {str(checkpoint)!r} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
    if weights is not None and loaded.weights == "init":
        raise ValueError(f"--weights {weights}: {text} has no trained weights to choose from (no checkpoint, not a "
                         "training run folder); drop --weights, or pass --checkpoint FILE")
    loaded.model.to(device)
    return loaded


def _field(config: Any, name: str) -> Any:
    """``config.name`` or ``config[name]`` (diffusers configs are dicts), None when absent."""
    if isinstance(config, Mapping) and name in config:
        return config[name]
    return getattr(config, name, None)


UNKNOWN_SIZE = "cannot tell the model's input size (its config has no image_size or sample_size): pass --image-size N"


def model_input(model: Any, image_size: Optional[int]) -> tuple[int, Optional[int]]:
    """``(size, channels)`` of the images to feed ``model``: the size from ``config.image_size``, else diffusers'
    ``config.sample_size`` (int or square pair), checked against ``image_size`` (``--image-size``); channels
    from ``config.in_channels`` (None when unknown). Raises ``ValueError`` when the sizes disagree or neither
    is known."""
    config = getattr(model, "config", None)
    size = _field(config, "image_size")
    if size is None:
        size = _field(config, "sample_size")
    if isinstance(size, (tuple, list)):
        if len(set(size)) != 1:
            raise ValueError(f"the model takes non-square {' x '.join(map(str, size))} inputs (config.sample_size); "
                             "gradconflict gram feeds square images only")
        size = size[0]
    channels = _field(config, "in_channels")
    channels = int(channels) if isinstance(channels, int) else None
    if size is None:
        if image_size is None:
            raise ValueError(UNKNOWN_SIZE)
        return image_size, channels
    size = int(size)
    if image_size is not None and image_size != size:
        raise ValueError(f"the model takes {size} x {size} images but --image-size is {image_size}: pass --image-size "
                         f"{size} (or leave it out for data of that size) or use a model built for that size")
    return size, channels


def conditional(model: Any, labels: Any, verbose: bool = True) -> bool:
    """Whether the data's class labels go to the model (as ``y``): when its config sets ``num_classes``. A model whose
    forward takes a ``y`` but whose config does not say (no ``num_classes`` at all) gets a note that its labels are
    not passed; ``num_classes = 0`` is unconditional on purpose."""
    classes = _field(getattr(model, "config", None), "num_classes")
    if bool(classes):
        return True
    labelled = labels is not None and bool((torch.as_tensor(labels) >= 0).any())  # -1: an unlabelled image
    if classes is None and labelled and verbose:
        try:
            takes_y = "y" in inspect.signature(model.forward).parameters
        except (TypeError, ValueError, AttributeError):
            takes_y = False
        if takes_y:
            print("note: the model's forward takes y, but its config does not set num_classes, so the data's class "
                  "labels are not passed to it; to condition on them set model.config.num_classes (e.g. a "
                  "types.SimpleNamespace(num_classes=10, ...)) in your build function", file=sys.stderr)
    return False


@contextlib.contextmanager
def forward_hint(model: Any, size: Any, image_size: Optional[int]) -> Iterator[None]:
    """Turn a failed forward into a ``ValueError`` naming the input size used when that size was not the model's
    own (it does not declare one): the images were read at ``size`` x ``size``, which the model may not take."""
    try:
        yield
    except RuntimeError as exc:
        if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower():
            raise  # memory, not the input size
        try:
            model_input(model, None)
            declared = True
        except ValueError:
            declared = False
        if declared:
            raise
        given = "--image-size" if image_size is not None else "the data's own size"
        raise ValueError(f"the model's forward failed on {_hw(size)} images ({given}: the model does not declare "
                         f"its input size) with: {first_line(exc)[:200]}; pass --image-size N for the size it "
                         "was built for, or set image_size in its config") from exc


def model_shape(model: Any) -> Optional[tuple[int, int]]:
    """``(H, W)`` of the inputs ``model``'s config declares (``image_size``, else diffusers' ``sample_size``: an int
    for a square or an (H, W) pair), None when it does not say."""
    config = getattr(model, "config", None)
    size = _field(config, "image_size")
    if size is None:
        size = _field(config, "sample_size")
    if isinstance(size, (tuple, list)) and len(size) == 2:
        return int(size[0]), int(size[1])
    return (int(size), int(size)) if isinstance(size, int) else None


def _hw(shape: Any) -> str:
    h, w = (shape, shape) if isinstance(shape, int) else shape
    return f"{h} x {w}"


def model_data(model: Any, data: str, image_size: Optional[int], limit: Optional[int] = None,
               scale: str = "auto") -> tuple[Any, Any]:
    """``(dataset, size)``: ``data`` at the model's input size, its channel count checked against the model's.

    A built-in dataset is resized to the model's (square) size or ``image_size``. The user's own files are read
    as stored, any ``(C, H, W)`` (non-square latents included): when their size differs from the model's they are
    refused unless ``image_size`` (``--image-size``) asks for the resize, and a resize that would change the
    aspect ratio (stretch) is always refused. When neither the model nor ``image_size`` gives the size, the
    files are read at their own size (with a note). ``scale`` (auto / none / minmax, ``.npy``/``.npz``): see
    ``gradconflict.data``. ``size`` is an int for square inputs, else the pair ``(H, W)``."""
    from .data import load_dataset

    shape = model_shape(model)
    channels = _field(getattr(model, "config", None), "in_channels")
    channels = int(channels) if isinstance(channels, int) else None
    if image_size is not None and shape is not None and shape != (image_size, image_size):
        if shape[0] != shape[1]:
            raise ValueError(f"the model takes {_hw(shape)} inputs (config.sample_size) but --image-size {image_size} "
                             "resizes to squares: leave out --image-size and give data of that size")
        model_input(model, image_size)  # raises the square mismatch message
    if not Path(data).exists():  # a built-in dataset: square images, resized
        if shape is not None and shape[0] != shape[1]:
            raise ValueError(f"the model takes non-square {_hw(shape)} inputs but {data!r} holds square images: "
                             "pass your own data of that size (.npy / .npz)")
        size, _ = model_input(model, image_size)
        dataset = load_dataset(data, image_size=size, limit=limit, scale=scale)
    else:
        dataset = load_dataset(data, image_size=None, limit=limit, scale=scale)
        native = tuple(int(v) for v in dataset.images.shape[-2:])
        target = shape or ((image_size, image_size) if image_size is not None else None)
        if target is None:
            print(f"note: the model's config does not give its input size; using the data's {_hw(native)}", file=sys.stderr)
            target = native
        elif native != target:
            if image_size is None:
                fix = (f"pass --image-size {target[0]} to resize them (bilinear, antialiased)" if target[0] == target[1]
                       else "give data of that size (inputs are never resized to a non-square size)")
                raise ValueError(f"{dataset.name!r} holds {_hw(native)} images but the model takes {_hw(target)}: {fix}")
            if native[0] * target[1] != native[1] * target[0]:
                raise ValueError(f"{dataset.name!r} holds {_hw(native)} images: resizing them to {_hw(target)} would "
                                 "stretch them (another aspect ratio); crop or pad them to that shape first")
            dataset = load_dataset(data, image_size=image_size, limit=limit, scale=scale)
        size = target[0] if target[0] == target[1] else target
    if channels is not None and dataset.channels != channels:
        raise ValueError(f"the model takes {channels} channels but {dataset.name!r} has {dataset.channels}")
    return dataset, size
