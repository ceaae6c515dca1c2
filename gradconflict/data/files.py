"""Image datasets from arrays and files: ``.npy``, ``.npz`` and folders of PNG/JPG images.

Every loader ends in ``images_to_tensor``, which returns channels-first float32 arrays ``(N, C, H, W)``:

* layout: ``(N, H, W)`` is grayscale; ``(N, H, W, C)`` or ``(N, C, H, W)`` with C in {1, 2, 3, 4} is told
  apart by which axis is small (channels-last when both could be);
* value range, chosen by ``scale`` (see ``SCALES``):

  - ``"auto"`` (default): images go to ``[-1, 1]`` the usual way and anything else is left alone.
    ``uint8`` -> ``x / 127.5 - 1``; other integers -> ``2 x / m - 1`` with m = 255 or 65535 (whichever
    holds the maximum); ``bool`` -> {-1, 1}; floats in ``[0, 1]`` -> ``2 x - 1``; floats in ``[-1, 1]``
    (with a negative value) unchanged; non-negative integer-valued floats up to 255 (pixel values stored
    as float) -> ``x / 127.5 - 1``; every other float array (e.g. VAE latents with std 1 in [-4.6, 4.7])
    is kept exactly as it is, not clamped. The choice is logged at INFO level (``logging``);
  - ``"none"``: values are never changed (only cast to float32, bool to {0, 1}), not clamped;
  - ``"minmax"``: ``2 (x - min) / (max - min) - 1`` over the whole array (the old behaviour for floats).
* size: bilinear ``F.interpolate`` with ``antialias=True`` to ``image_size x image_size`` pixels; non-square
  images are refused rather than stretched (``image_size=None`` keeps any (H, W), e.g. non-square latents);
  data mapped to ``[-1, 1]`` are then clamped to ``[-1, 1]``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

__all__ = [
    "ImageDataset",
    "IMAGE_EXTENSIONS",
    "images_to_tensor",
    "load_npy",
    "load_npz",
    "load_folder",
    "as_dataset",
]

logger = logging.getLogger(__name__)

SCALES: tuple[str, ...] = ("auto", "none", "minmax")
"""Accepted values of ``scale`` (see the module docstring)."""

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class ImageDataset(Dataset):
    """Images ``(N, C, H, W)`` float32 (in ``[-1, 1]``, or latents as stored) with labels ``(N,)`` long (``-1`` = no label).

    ``dataset[i]`` is ``(image (C, H, W), label)``. ``num_classes`` = max label + 1 (0 when unlabelled).
    ``conditioning``: per-sample tensors by name, each ``(N, ...)`` with row ``i`` belonging to image ``i`` (e.g.
    ``encoder_hidden_states`` (N, L, D)); they go to the model as keyword arguments of that name
    (``gradconflict.adapters.conditioning``).
    """

    def __init__(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None, name: str = "images",
                 class_names: Optional[Sequence[str]] = None,
                 conditioning: Optional[dict[str, torch.Tensor]] = None) -> None:
        from ..adapters.conditioning import check_conditioning

        if images.ndim != 4:
            raise ValueError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
        if images.shape[0] == 0:
            raise ValueError(f"dataset {name!r} is empty: it holds no images")
        n = images.shape[0]
        labels = torch.full((n,), -1, dtype=torch.long) if labels is None else torch.as_tensor(labels).long().reshape(-1)
        if labels.shape[0] != n:
            raise ValueError(f"dataset {name!r} has {n} images but {labels.shape[0]} labels")
        self.images = images.float().contiguous()
        self.labels = labels
        self.name = name
        self.class_names = list(class_names) if class_names is not None else None
        self.num_classes = int(labels.max()) + 1 if bool((labels >= 0).any()) else 0
        self.conditioning = check_conditioning(conditioning or {}, n, name)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]

    @property
    def image_size(self) -> int:
        """Height (= width) of the images in pixels."""
        return int(self.images.shape[-1])

    @property
    def channels(self) -> int:
        """Number of channels C."""
        return int(self.images.shape[1])

    def __repr__(self) -> str:
        n, c, h, w = self.images.shape
        return f"ImageDataset(name={self.name!r}, n={n}, shape=({c}, {h}, {w}), num_classes={self.num_classes})"


def _channels_first(arr: np.ndarray, source: str) -> np.ndarray:
    if arr.ndim == 3:
        return arr[:, None]
    if arr.ndim == 4:
        small = (1, 2, 3, 4)
        if arr.shape[-1] in small:
            return np.moveaxis(arr, -1, 1)
        if arr.shape[1] in small:
            return arr
        raise ValueError(
            f"{source}: cannot tell the channel axis of shape {arr.shape}; use (N, H, W), (N, H, W, C) or "
            "(N, C, H, W) with C in 1..4"
        )
    raise ValueError(f"{source}: images must be (N, H, W), (N, H, W, C) or (N, C, H, W), got shape {arr.shape}")


def _check_scale(scale: str) -> str:
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; use one of {list(SCALES)} ('auto' maps images to [-1, 1] "
                         "and keeps other data such as latents, 'none' never changes values)")
    return scale


def _model_range(arr: np.ndarray, source: str, scale: str = "auto") -> tuple[np.ndarray, bool]:
    """float32 values for the model and whether they were mapped to [-1, 1] (see the module docstring)."""
    _check_scale(scale)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.float32)
        return (arr, False) if scale == "none" else (arr * 2 - 1, True)
    if arr.dtype.kind not in "iuf":
        raise ValueError(f"{source}: images must hold numbers, got dtype {arr.dtype}; convert them with arr.astype(np.float32)")
    x = arr.astype(np.float32)
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{source}: images contain NaN or Inf; remove or replace those entries")
    if scale == "none" or x.size == 0:
        return x, False
    lo, hi = float(x.min()), float(x.max())
    if scale == "minmax":
        return (x - lo) / max(hi - lo, 1e-12) * 2 - 1, True
    if arr.dtype.kind in "iu":
        if lo < 0:
            raise ValueError(f"{source}: integer images must be >= 0, got minimum {arr.min()}; "
                             "pass scale='none' to keep signed integer data as it is")
        top = 255.0 if hi <= 255 else (65535.0 if hi <= 65535 else hi)
        logger.info("%s: %s images in [0, %g] mapped to [-1, 1] by x / %g - 1", source, arr.dtype, top, top / 2)
        return x / np.float32(top / 2) - 1, True
    if lo >= 0 and hi <= 1:
        logger.info("%s: float images in [0, 1] mapped to [-1, 1] by 2 x - 1", source)
        return x * 2 - 1, True
    if lo >= -1 and hi <= 1:
        logger.info("%s: float images already in [-1, 1], values kept", source)
        return x, True
    if lo >= 0 and hi <= 255 and np.array_equal(x, np.round(x)):
        logger.info("%s: integer-valued float images in [0, 255] mapped to [-1, 1] by x / 127.5 - 1", source)
        return x / np.float32(127.5) - 1, True
    logger.info("%s: float data in [%.4g, %.4g] are not images in [0, 1] or [-1, 1]; values kept as they are "
                "(pass scale='minmax' to rescale them to [-1, 1])", source, lo, hi)
    return x, False


def images_to_tensor(images: Any, image_size: Optional[int] = 16, *, source: str = "images",
                     scale: str = "auto") -> torch.Tensor:
    """Array/tensor of images -> float32 ``(N, C, image_size, image_size)`` (None keeps the size).

    ``scale``: ``"auto"`` maps images to ``[-1, 1]`` (uint8: ``x / 127.5 - 1``, floats in [0, 1]: ``2 x - 1``,
    floats in [-1, 1]: unchanged) and keeps other float data such as latents exactly; ``"none"`` never
    changes values; ``"minmax"`` rescales to ``[-1, 1]``. See the module docstring.
    """
    arr = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if arr.ndim in (3, 4) and arr.shape[0] == 0:
        raise ValueError(f"{source}: empty dataset (0 images)")
    values, unit = _model_range(arr, source, scale)
    x = torch.from_numpy(np.ascontiguousarray(_channels_first(values, source)))
    if image_size is not None:
        if image_size < 1:
            raise ValueError(f"image_size must be a positive number of pixels, got {image_size}")
        h, w = x.shape[-2:]
        if h != w and (h, w) != (image_size, image_size):
            raise ValueError(f"{source}: the images are {h} x {w} (height x width): resizing them to {image_size} x "
                             f"{image_size} would stretch them; crop or pad them to a square first, or keep their "
                             "size (image_size=None; on the command line leave out --image-size)")
        if x.shape[-2:] != (image_size, image_size):
            x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
    if unit:
        x = x.clamp(-1, 1)
    return x.float().contiguous()


def _limit(n: int, limit: Optional[int]) -> int:
    if limit is None:
        return n
    if limit < 1:
        raise ValueError(f"limit must be a positive number of images, got {limit}")
    return min(n, limit)


def _load_array(path: Path) -> Any:
    try:
        return np.load(path, allow_pickle=False)
    except Exception as err:  # noqa: BLE001 - numpy raises several types for corrupt files
        raise ValueError(f"cannot read {path}: {err}; save it with numpy.save / numpy.savez") from err


def load_npy(path: str | Path, *, image_size: Optional[int] = 16, limit: Optional[int] = None,
             scale: str = "auto") -> ImageDataset:
    """Unlabelled images from a ``.npy`` array of shape (N, H, W), (N, H, W, C) or (N, C, H, W).

    ``scale="auto"`` maps images to [-1, 1] and keeps float data outside [-1, 1] (latents) exactly;
    ``"none"`` never changes values; ``"minmax"`` rescales to [-1, 1] (module docstring)."""
    _check_scale(scale)
    path = Path(path)
    arr = _load_array(path)
    if arr.ndim < 1 or arr.shape[0] == 0:
        raise ValueError(f"{path} holds no images (shape {arr.shape}); it must be (N, H, W[, C]) with N >= 1")
    arr = arr[: _limit(arr.shape[0], limit)]
    return ImageDataset(images_to_tensor(arr, image_size, source=str(path), scale=scale), name=path.stem)


def load_npz(path: str | Path, *, image_size: Optional[int] = 16, limit: Optional[int] = None,
             scale: str = "auto") -> ImageDataset:
    """Images from the key ``images`` of an ``.npz`` archive, with integer ``labels`` (N,) if present.

    ``labels`` may also be named ``class_labels``. Every other array is per-sample conditioning passed to the
    model by its name (``ImageDataset.conditioning``; e.g. ``encoder_hidden_states`` (N, L, D),
    ``encoder_attention_mask`` (N, L), ``added_cond_kwargs.text_embeds``): its first dimension must be N, and
    ``limit`` keeps the same first rows of every array. ``scale`` as in :func:`load_npy` (images only)."""
    from ..adapters.conditioning import LABEL_KEYS, check_conditioning

    _check_scale(scale)
    path = Path(path)
    with _load_array(path) as archive:
        if "images" not in archive.files:
            raise ValueError(f"{path} has no array named 'images' (keys: {archive.files}); save it with np.savez(path, images=..., labels=...)")
        arr = archive["images"]
        given = [k for k in LABEL_KEYS if k in archive.files]
        if len(given) > 1:
            raise ValueError(f"{path} holds both 'labels' and 'class_labels': they name the same class labels; keep one")
        labels = archive[given[0]] if given else None
        extra = {k: archive[k] for k in archive.files if k != "images" and k not in LABEL_KEYS}
    if arr.ndim < 1 or arr.shape[0] == 0:
        raise ValueError(f"{path}: 'images' holds no images (shape {arr.shape})")
    if labels is not None and labels.reshape(-1).shape[0] != arr.shape[0]:
        raise ValueError(f"{path}: 'images' has {arr.shape[0]} entries but {given[0]!r} has {labels.reshape(-1).shape[0]}")
    conditioning = check_conditioning(extra, arr.shape[0], str(path))  # checked on all N rows, then limited
    n = _limit(arr.shape[0], limit)
    y = None if labels is None else torch.from_numpy(np.asarray(labels).reshape(-1)[:n].astype(np.int64))
    return ImageDataset(images_to_tensor(arr[:n], image_size, source=str(path), scale=scale), y, name=path.stem,
                        conditioning={k: v[:n].contiguous() for k, v in conditioning.items()})


def _read_image(path: Path) -> np.ndarray:
    """(H, W) or (H, W, 3) array of one image file; uint8 from Pillow, float in [0, 1] from matplotlib."""
    try:
        try:
            from PIL import Image
        except ImportError:  # pragma: no cover - Pillow ships with matplotlib
            import matplotlib.image as mpimg

            arr = np.asarray(mpimg.imread(path))
            return arr[..., :3] if arr.ndim == 3 else arr
        with Image.open(path) as im:
            gray = im.mode in ("1", "L", "LA", "I", "I;16", "F") or (im.mode == "P" and "transparency" not in im.info and _palette_is_gray(im))
            return np.asarray(im.convert("L" if gray else "RGB"))
    except Exception as err:  # noqa: BLE001 - image readers raise many error types
        raise ValueError(f"cannot read image {path}: {err}; remove or re-save the file as PNG") from err


def _palette_is_gray(im: Any) -> bool:
    rgb = np.asarray(im.convert("RGB"))
    return bool(np.all(rgb[..., 0] == rgb[..., 1]) and np.all(rgb[..., 1] == rgb[..., 2]))


def load_folder(path: str | Path, *, image_size: Optional[int] = 16, limit: Optional[int] = None) -> ImageDataset:
    """Images from a folder. Files directly inside are unlabelled (label -1); files in sub-folders get the
    sub-folder's index in sorted order as label (``root/cat/1.png`` -> class of "cat"). All images must have
    one size; grayscale images are repeated to RGB when the folder also holds colour images.

    Per-sample conditioning: a sidecar ``root/conditioning.npz`` with ``files`` (the images' paths relative to
    ``root``, e.g. ``"cat/1.png"``) and arrays whose row ``i`` belongs to ``files[i]`` (e.g.
    ``encoder_hidden_states`` (M, L, D)); every image of the folder must be listed (:data:`SIDECAR`)."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"no such folder: {root}")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and _image_files(d))
    entries = [(f, -1) for f in _image_files(root)]
    for k, name in enumerate(classes):
        entries += [(f, k) for f in _image_files(root / name)]
    if not entries:
        raise ValueError(f"folder {root} holds no images ({', '.join(IMAGE_EXTENSIONS)}), neither directly nor in sub-folders")
    entries = entries[: _limit(len(entries), limit)]
    arrays = [_read_image(f) for f, _ in entries]
    first = arrays[0].shape[:2]
    for (f, _), a in zip(entries, arrays):
        if a.shape[:2] != first:
            raise ValueError(
                f"images of mixed sizes in {root}: {entries[0][0].name} is {first[1]}x{first[0]} but {f.name} is "
                f"{a.shape[1]}x{a.shape[0]} pixels; resize them to one size first"
            )
    if any(a.ndim == 3 for a in arrays):
        arrays = [a if a.ndim == 3 else np.repeat(a[..., None], 3, axis=-1) for a in arrays]
    stacked = np.stack([a.astype(np.float32) / 255.0 if a.dtype == np.uint8 else a.astype(np.float32) for a in arrays])
    labels = torch.tensor([k for _, k in entries], dtype=torch.long)
    conditioning = _sidecar(root, [f.relative_to(root).as_posix() for f, _ in entries])
    return ImageDataset(images_to_tensor(stacked, image_size, source=str(root)), labels, name=root.name,
                        class_names=classes or None, conditioning=conditioning)


SIDECAR = "conditioning.npz"
"""File name of an image folder's per-sample conditioning (see :func:`load_folder`)."""


def _sidecar(root: Path, names: list[str]) -> dict[str, np.ndarray]:
    """The rows of ``root/conditioning.npz`` for the images ``names`` (paths relative to ``root``), in that order."""
    path = root / SIDECAR
    if not path.is_file():
        return {}
    with _load_array(path) as archive:
        if "files" not in archive.files:
            raise ValueError(f"{path} has no array 'files' (the images' paths relative to {root}, one per row); save it "
                             "with np.savez(path, files=np.array(['cat/1.png', ...]), encoder_hidden_states=...)")
        files = [str(f) for f in archive["files"].reshape(-1)]
        arrays = {k: archive[k] for k in archive.files if k != "files"}
    for key, value in arrays.items():
        if value.ndim == 0 or value.shape[0] != len(files):
            raise ValueError(f"{path}: conditioning {key!r} has shape {value.shape} but 'files' lists {len(files)} "
                             f"images: its first dimension must be {len(files)}; fix or remove {key!r}")
    row = {f: i for i, f in enumerate(files)}
    missing = [n for n in names if n not in row]
    if missing:
        raise ValueError(f"{path} lists no conditioning for {len(missing)} image(s), e.g. {missing[:3]}; add them to "
                         "'files' (paths relative to the folder) or remove those images")
    pick = np.array([row[n] for n in names])
    return {k: v[pick] for k, v in arrays.items()}


def _image_files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)


def as_dataset(dataset: Any, *, image_size: Optional[int] = None, limit: Optional[int] = None, name: str = "dataset",
               scale: str = "auto") -> ImageDataset:
    """Wrap any map-style or iterable torch Dataset whose items are images or ``(image, label)`` pairs.

    Images may be tensors (C, H, W) / (H, W) or arrays (H, W[, C]); they are scaled by ``scale`` as in the
    module docstring. ``image_size=None`` keeps their size.
    """
    _check_scale(scale)
    if isinstance(dataset, ImageDataset) and image_size in (None, dataset.image_size) and limit is None:
        return dataset
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of images, got {limit}")
    images, labels = [], []
    for i, item in enumerate(dataset):
        if limit is not None and i >= limit:
            break
        image, label = (item[0], item[1]) if isinstance(item, (tuple, list)) else (item, -1)
        if isinstance(image, torch.Tensor):
            arr = image.detach().cpu().numpy()
            arr = arr if arr.ndim == 2 else np.moveaxis(arr, 0, -1)  # tensors are channels-first
        else:
            arr = np.asarray(image)
        images.append(arr)
        labels.append(int(label) if label is not None else -1)
    if not images:
        raise ValueError(f"{name}: the dataset is empty (it yielded no items)")
    shapes = {a.shape for a in images}
    if len(shapes) > 1:
        raise ValueError(f"{name}: images of mixed sizes {sorted(shapes)[:3]}; resize them to one size first")
    stacked = np.stack(images)
    if stacked.ndim == 4 and stacked.shape[-1] not in (1, 2, 3, 4):
        raise ValueError(f"{name}: cannot interpret image shape {images[0].shape}; use (C, H, W) tensors")
    x = images_to_tensor(stacked, image_size, source=name, scale=scale)
    return ImageDataset(x, torch.tensor(labels, dtype=torch.long), name=name)
