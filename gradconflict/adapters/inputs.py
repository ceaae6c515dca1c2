"""What a model takes: its input size and channels (from its config), whether it gets the data's class labels, and
the data read at that size.

``model_input`` / ``model_shape`` read ``config.image_size`` (else diffusers' ``config.sample_size``) and
``config.in_channels``; ``model_data`` loads a dataset at that size and checks its channels; ``conditional``
says whether the labels go to the model (``config.num_classes``); ``forward_hint`` turns a failed forward at a
guessed size into a one-line error naming that size.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from ..engine.checks import first_line
from .conditioning import LABELS_ARG

__all__ = ["UNKNOWN_SIZE", "model_input", "model_shape", "model_data", "conditional", "forward_hint"]


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
            takes_y = LABELS_ARG in inspect.signature(model.forward).parameters
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
    from ..data import load_dataset

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
