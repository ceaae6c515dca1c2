"""Diffusers models as ``model(x_t, t, y=None, **conditioning) -> prediction shaped like x_t``, from a local folder.

``DiffusersModel`` wraps a UNet2DModel, UNet2DConditionModel (Stable-Diffusion-style), DiTTransformer2DModel,
Transformer2DModel (class- or text-conditioned, e.g. PixArt-style) or PixArtTransformer2DModel: it calls
``net(x_t, timestep=t, class_labels=y, encoder_hidden_states=..., encoder_attention_mask=..., added_cond_kwargs=...)``
with the conditioning it is given (``gradconflict.adapters.conditioning``), unwraps ``.sample`` and, for a learned variance
(``out_channels = 2 C``, output ``[prediction | variance]`` along channels), keeps the first ``C`` channels:
the eps / x0 / v prediction. The variance half gets no gradient (the plain ``||y - y_hat||^2`` loss).

``load_diffusers(path)`` reads a pipeline folder (``unet/`` or ``transformer/`` plus ``scheduler/``) or a model
folder with a scheduler folder beside it, never the network (``local_files_only=True``); the schedule is
``alphabar_t = scheduler.alphas_cumprod[t]`` and the prediction type that of the scheduler's config.
diffusers is imported only inside these functions.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn

from ..schedule import NoiseSchedule, prediction_type_of
from .loaded import LoadedModel
from .conditioning import nest

__all__ = ["SUPPORTED_CLASSES", "DiffusersConfig", "DiffusersModel", "load_diffusers"]

SUPPORTED_CLASSES: tuple[str, ...] = ("UNet2DModel", "UNet2DConditionModel", "DiTTransformer2DModel", "Transformer2DModel",
                                      "PixArtTransformer2DModel")
_NOT_CONDITIONING = ("self", "sample", "hidden_states", "timestep", "class_labels", "return_dict")
MODEL_SUBFOLDERS: tuple[str, ...] = ("unet", "transformer")
INSTALL_HINT = "pip install gradconflict[diffusers]"


@dataclass(frozen=True)
class DiffusersConfig:
    """What the rest of gradconflict reads from ``model.config``.

    ``in_channels`` = C of ``x_t``; ``out_channels`` = C or 2C (learned variance); ``image_size`` = height =
    width (None when not square); ``num_classes`` = 0 for an unconditional model; ``null_label`` = the
    label id of the "no class" embedding used for classifier-free guidance (None when there is none).
    ``cross_attention_dim`` = D of the ``encoder_hidden_states`` (N, L, D) a text-conditioned model needs (None
    when it has no cross-attention).
    """

    class_name: str
    in_channels: int
    out_channels: int
    sample_size: Any
    image_size: Optional[int]
    conditional: bool
    num_classes: int
    null_label: Optional[int]
    cross_attention_dim: Optional[int] = None

    @property
    def learned_variance(self) -> bool:
        """True when the model outputs ``[prediction | variance]``: ``out_channels = 2 * in_channels``."""
        return self.out_channels == 2 * self.in_channels


class DiffusersModel(nn.Module):
    """``forward(x_t, t, y=None, **kwargs)`` of a diffusers 2D model, returning a tensor shaped like ``x_t``.

    Labels: ``y`` goes to ``class_labels=``. For a class-conditional model (DiT; a UNet2DModel with a class
    embedding; a Transformer2DModel with ``norm_type="ada_norm_zero"``) ``y=None`` and labels ``< 0`` mean
    "no label" and pass the null class ``null_label = num_classes`` (the classifier-free-guidance embedding);
    without one, ``y`` is required. An unconditional model gets no ``class_labels``. Extra ``kwargs`` (e.g.
    ``encoder_hidden_states`` (N, L, D), ``encoder_attention_mask`` (N, L); ``added_cond_kwargs.NAME`` goes into
    ``added_cond_kwargs``) are passed through; a model with cross-attention requires ``encoder_hidden_states``
    (see ``conditioning_keys``). The wrapped model is the submodule ``self.model``.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = _read_config(model)

    @property
    def conditioning_keys(self) -> tuple[str, ...]:
        """Names of the per-sample conditioning the wrapped model's ``forward`` takes besides ``x_t``, ``t``, ``y``."""
        params = inspect.signature(self.model.forward).parameters
        return tuple(name for name in params if name not in _NOT_CONDITIONING)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None, **kwargs: Any) -> torch.Tensor:
        """Prediction ``f(x_t, t, y)`` with the shape of ``x_t`` (first C channels when the variance is learned)."""
        t = torch.as_tensor(t, device=x_t.device)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        labels = self._labels(y, x_t)
        kwargs = nest(kwargs)
        if labels is not None:
            kwargs["class_labels"] = labels
        dim = self.config.cross_attention_dim
        if dim is not None and kwargs.get("encoder_hidden_states") is None:
            raise ValueError(f"{self.config.class_name} is text-conditioned (cross-attention, D = {dim}): give per-sample "
                             f"encoder_hidden_states (N, L, {dim}) in the data file, or run it unconditionally with "
                             "--null-conditioning")
        if self.model.config.get("norm_type") == "ada_norm_single":
            kwargs.setdefault("added_cond_kwargs", {"resolution": None, "aspect_ratio": None})  # PixArt-style
        out = self.model(x_t, timestep=t, **kwargs)
        if hasattr(out, "sample"):
            out = out.sample
        elif isinstance(out, (tuple, list)):
            out = out[0]
        if self.config.learned_variance:
            out = out[:, : self.config.in_channels]
        return out

    def _labels(self, y: Optional[torch.Tensor], x_t: torch.Tensor) -> Optional[torch.Tensor]:
        cfg = self.config
        if not cfg.conditional:
            if y is not None:
                raise ValueError(f"{cfg.class_name} is unconditional (no class embedding): call it with y=None")
            return None
        null = cfg.null_label
        if y is None:
            if null is None:
                raise ValueError(f"{cfg.class_name} is class-conditional and has no null class: pass class labels y")
            return torch.full((x_t.shape[0],), null, dtype=torch.long, device=x_t.device)
        y = torch.as_tensor(y, device=x_t.device)
        if cfg.num_classes and not y.is_floating_point() and y.numel() and int(y.max()) >= cfg.num_classes:
            raise ValueError(
                f"{cfg.class_name} has {cfg.num_classes} classes (labels 0..{cfg.num_classes - 1}) but got label "
                f"{int(y.max())}; pass labels of the classes it was trained on (or y < 0 / None for no class)"
            )
        if not y.is_floating_point() and bool((y < 0).any()):
            if null is None:
                raise ValueError(f"{cfg.class_name} has no null class: labels must be >= 0, got {int(y.min())}")
            y = torch.where(y < 0, torch.full_like(y, null), y)
        return y

    def load_state_dict(self, state_dict: dict, strict: bool = True, assign: bool = False) -> Any:  # type: ignore[override]
        """Load a state dict of this wrapper or of the wrapped model (keys without the ``model.`` prefix)."""
        if state_dict and not any(str(k).startswith("model.") for k in state_dict):
            state_dict = {f"model.{k}": v for k, v in state_dict.items()}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def _class_name(model: nn.Module) -> str:
    for cls in type(model).__mro__:
        if cls.__name__ in SUPPORTED_CLASSES:
            return cls.__name__
    raise ValueError(
        f"{type(model).__name__} is not supported by DiffusersModel (use one of {SUPPORTED_CLASSES}); wrap other "
        "models yourself and pass --model file.py:function"
    )


def _read_config(model: nn.Module) -> DiffusersConfig:
    name = _class_name(model)
    cfg = model.config
    c_in = cfg.get("in_channels")
    if not isinstance(c_in, int):
        raise ValueError(f"{name} has in_channels={c_in!r}: only continuous image inputs (N, C, H, W) are supported")
    c_out = cfg.get("out_channels") or c_in  # all three classes: out_channels=None means in_channels
    if c_out not in (c_in, 2 * c_in):
        raise ValueError(f"{name} maps {c_in} to {c_out} channels: expected {c_in} (or {2 * c_in} with a learned variance)")
    if name in ("UNet2DModel", "UNet2DConditionModel"):
        conditional = getattr(model, "class_embedding", None) is not None
        num_classes = int(cfg.get("num_class_embeds") or 0)
    else:
        conditional = name == "DiTTransformer2DModel" or cfg.get("norm_type") == "ada_norm_zero"
        num_classes = int(cfg.get("num_embeds_ada_norm") or 0) if conditional else 0
    size = cfg.get("sample_size")
    square = size if isinstance(size, int) else (size[0] if isinstance(size, (tuple, list)) and len(set(size)) == 1 else None)
    return DiffusersConfig(name, c_in, int(c_out), size, square, conditional, num_classes,
                           _null_label(model) if conditional else None, _text_dim(model))


def _text_dim(model: nn.Module) -> Optional[int]:
    """D of the ``encoder_hidden_states`` the model's cross-attention reads (None without cross-attention):
    ``encoder_hid_dim`` / ``caption_channels`` (PixArt) when it projects them first, else ``cross_attention_dim``
    (one value for all blocks)."""
    if not any(getattr(m, "is_cross_attention", False) for m in model.modules()):
        return None
    cfg = model.config
    dim = cfg.get("encoder_hid_dim") or cfg.get("caption_channels") or cfg.get("cross_attention_dim")
    if isinstance(dim, (tuple, list)):
        if len(set(dim)) != 1:
            raise ValueError(f"the model's blocks take text embeddings of different widths {list(dim)}; "
                             "gradconflict passes one encoder_hidden_states tensor: wrap it yourself (file.py:function)")
        dim = dim[0]
    return int(dim) if dim is not None else None


def _null_label(model: nn.Module) -> Optional[int]:
    """Index of the extra "no class" row of a label embedding table (rows = num_classes + 1), if any."""
    for m in model.modules():
        table, k = getattr(m, "embedding_table", None), getattr(m, "num_classes", None)
        if isinstance(table, nn.Embedding) and isinstance(k, int):
            return k if table.num_embeddings > k else None
    return None


def _import_diffusers() -> Any:
    try:
        import diffusers
    except ImportError as err:
        raise ImportError(f"loading a diffusers model needs the diffusers package: {INSTALL_HINT}") from err
    return diffusers


def _json_class(path: Path) -> Optional[str]:
    try:
        return json.loads(path.read_text()).get("_class_name")
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read {str(path)!r}: {err}") from None


def _model_dir(root: Path, subfolder: Optional[str]) -> Path:
    if subfolder is not None:
        folder = root / subfolder
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"no model in {str(folder)!r}: it has no config.json; check subfolder={subfolder!r}")
        return folder
    for name in MODEL_SUBFOLDERS:
        if (root / name / "config.json").is_file():
            return root / name
    if (root / "config.json").is_file():
        return root
    raise ValueError(
        f"no diffusers model in {str(root)!r}: expected a pipeline folder with a 'unet/' or 'transformer/' "
        "subfolder holding config.json, or a model folder with config.json (model.save_pretrained(folder)); "
        "or pass subfolder='...'"
    )


def _scheduler_dir(root: Path, model_dir: Path, scheduler_subfolder: str) -> Path:
    rel = Path(scheduler_subfolder)
    tried = [rel] if rel.is_absolute() else [root / rel, model_dir.parent / rel]
    for folder in dict.fromkeys([*tried, model_dir]):
        if (folder / "scheduler_config.json").is_file():
            return folder
    raise FileNotFoundError(
        f"no scheduler for {str(model_dir)!r}: none of {[str(p) for p in dict.fromkeys(tried)]} holds "
        "scheduler_config.json; save it with scheduler.save_pretrained(path/'scheduler') or pass scheduler_subfolder=..."
    )


def load_diffusers(path: str | Path, *, subfolder: Optional[str] = None, scheduler_subfolder: str = "scheduler",
                   device: str | torch.device = "cpu", dtype: Optional[torch.dtype] = None) -> LoadedModel:
    """A diffusers model and its scheduler from a LOCAL folder, as a ``LoadedModel``.

    ``path``: a pipeline folder (``unet/`` or ``transformer/`` and ``scheduler/``) or a model folder (its
    ``config.json``) with ``scheduler_subfolder`` in it or beside it. ``subfolder`` names the model folder
    explicitly. Schedule: ``alphabar_t = scheduler.alphas_cumprod[t]`` (float64); prediction: the
    scheduler's ``prediction_type`` (epsilon -> "eps", v_prediction -> "v", sample -> "x0"). ``dtype``
    (e.g. ``torch.float64``) is the weights' dtype, passed to ``from_pretrained`` (default: float32).
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"diffusers folder {str(root)!r} does not exist: save a model there with save_pretrained")
    diffusers = _import_diffusers()
    model_dir = _model_dir(root, subfolder)
    scheduler_dir = _scheduler_dir(root, model_dir, scheduler_subfolder)
    name = _json_class(model_dir / "config.json")
    if name not in SUPPORTED_CLASSES:
        raise ValueError(f"{str(model_dir)!r} holds a {name}; supported: {SUPPORTED_CLASSES} (or use --model file.py:function)")
    net = getattr(diffusers, name).from_pretrained(str(model_dir), local_files_only=True, torch_dtype=dtype)
    sched_name = _json_class(scheduler_dir / "scheduler_config.json") or "DDPMScheduler"
    sched_cls = getattr(diffusers, sched_name, None)
    if sched_cls is None:
        raise ValueError(f"diffusers {diffusers.__version__} has no scheduler class {sched_name!r} ({str(scheduler_dir)!r})")
    scheduler = sched_cls.from_pretrained(str(scheduler_dir), local_files_only=True)
    model = DiffusersModel(net)
    schedule = NoiseSchedule.from_diffusers(scheduler)
    return LoadedModel(model.to(device), schedule, prediction_type_of(scheduler), f"diffusers {root}")
