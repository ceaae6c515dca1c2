"""Loss-weighting strategies of diffusion training, expressed as a weight on the x0-unit loss.

A strategy is a function ``w(SNR)`` of the per-timestep SNR. Its weight on the loss of a model trained in
another space follows from ``||eps - eps_hat||^2 = SNR ||x0 - x0_hat||^2`` and
``||v - v_hat||^2 = (SNR + 1) ||x0 - x0_hat||^2``:

    weight(snr, "x0") = w(SNR)
    weight(snr, "eps") = w(SNR) / SNR
    weight(snr, "v")  = w(SNR) / (SNR + 1)

| strategy        | x0 weight              | eps weight             | v weight                   |
|-----------------|------------------------|------------------------|----------------------------|
| constant        | 1                      | 1 / SNR                | 1 / (SNR + 1)              |
| snr             | SNR                    | 1                      | SNR / (SNR + 1)            |
| max_snr(gamma)  | max(SNR, gamma)        | max(SNR, gamma) / SNR  | max(SNR, gamma)/(SNR + 1)  |
| min_snr(gamma)  | min(SNR, gamma)        | min(SNR, gamma) / SNR  | min(SNR, gamma)/(SNR + 1)  |
| soft_min_snr(g) | SNR g / (SNR + g)      | g / (SNR + g)          | SNR g / ((SNR + g)(SNR+1)) |
| inv_snr         | 1 / SNR                | 1 / SNR^2              | 1 / (SNR (SNR + 1))        |
| p2(gamma, k)    | SNR / (k + SNR)^gamma  | 1 / (k + SNR)^gamma    | SNR / ((k+SNR)^gamma (SNR+1)) |

**SNR = 0 and SNR = inf.** Public trainers compute ``min(SNR, gamma) / SNR`` literally and get NaN at the
last step of a zero-terminal-SNR schedule. Here every weight is finite: where the formula has a finite
limit it is used exactly (Min-SNR's eps weight is 1 at SNR = 0, SNR's v weight is 1 at SNR = inf); where it
diverges (constant's eps weight at SNR = 0), SNR is clamped into ``[SNR_MIN, SNR_MAX] = [1e-12, 1e12]``
first, so the weight is large but finite. User callables are always evaluated on the clamped SNR.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np

from ._arrays import as_float64_numpy, like_input
from .targets import normalize_prediction

__all__ = [
    "SNR_MIN",
    "SNR_MAX",
    "WeightingStrategy",
    "constant",
    "snr",
    "max_snr",
    "min_snr",
    "soft_min_snr",
    "inv_snr",
    "p2",
    "custom",
    "by_name",
    "as_strategy",
    "check_unique_names",
    "DEFAULT_STRATEGIES",
]

SNR_MIN = 1e-12
SNR_MAX = 1e12

ArrayFn = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True, eq=False)
class WeightingStrategy:
    """A loss weighting ``w(SNR)`` in x0 units, with optional exact eps/v forms that stay finite at the limits.

    ``x0_fn``, ``eps_fn`` and ``v_fn`` take a float64 array of SNR values (already clamped for the generic
    path) and return weights. Without ``eps_fn``/``v_fn`` the weight is ``x0_fn(s) / s`` or
    ``x0_fn(s) / (s + 1)`` on the clamped SNR.
    """

    name: str
    x0_fn: ArrayFn
    eps_fn: Optional[ArrayFn] = None
    v_fn: Optional[ArrayFn] = None
    exact_x0: bool = False  # x0_fn accepts SNR = 0 and inf directly (built-ins); user callables get clamped SNR

    def weight(self, snr: Any, target: str = "x0") -> Any:
        """Weight on the per-sample squared error in ``target`` units ("x0", "eps" or "v") at the given SNR.

        Tensor, array or float in, same kind out (float64). Raises ``ValueError`` for negative or NaN SNR and
        for a weight that comes out negative or non-finite.
        """
        kind = normalize_prediction(target)
        s = as_float64_numpy(snr)
        if np.any(np.isnan(s)) or np.any(s < 0):
            raise ValueError(f"SNR must be >= 0 and not NaN (strategy {self.name!r})")
        clamped = np.clip(s, SNR_MIN, SNR_MAX)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            if kind == "x0":
                w = self.x0_fn(s if self.exact_x0 else clamped)
            elif kind == "eps":
                w = self.eps_fn(s) if self.eps_fn is not None else self.x0_fn(clamped) / clamped
            else:
                w = self.v_fn(s) if self.v_fn is not None else self.x0_fn(clamped) / (clamped + 1.0)
        w = np.broadcast_to(np.asarray(w, dtype=np.float64), s.shape).copy()
        bad = ~np.isfinite(w)
        if np.any(bad):
            # exact forms may diverge at the limits: fall back to the clamped generic formula there
            x0 = np.asarray(self.x0_fn(clamped), dtype=np.float64)
            x0 = np.broadcast_to(x0, s.shape)
            generic = {"x0": x0, "eps": x0 / clamped, "v": x0 / (clamped + 1.0)}[kind]
            w[bad] = np.broadcast_to(generic, s.shape)[bad]
        if not np.all(np.isfinite(w)) or np.any(w < 0):
            raise ValueError(
                f"strategy {self.name!r} gave a negative or non-finite weight; a weight must be finite and >= 0"
            )
        return like_input(w, snr)

    __call__ = weight

    def __repr__(self) -> str:
        return f"WeightingStrategy({self.name!r})"


def _builtin(name: str, x0_fn: ArrayFn, eps_fn: Optional[ArrayFn] = None, v_fn: Optional[ArrayFn] = None) -> WeightingStrategy:
    return WeightingStrategy(name, x0_fn, eps_fn, v_fn, exact_x0=True)


def _fmt(x: float) -> str:
    return f"{x:g}"


def constant() -> WeightingStrategy:
    """Unweighted x0 loss: ``w = 1`` (eps weight ``1/SNR``, v weight ``1/(SNR+1)``)."""
    return _builtin("constant", lambda s: np.ones_like(s), eps_fn=lambda s: 1.0 / s, v_fn=lambda s: 1.0 / (s + 1.0))


def snr() -> WeightingStrategy:
    """SNR weighting, ``w = SNR``: the plain eps-prediction loss."""
    return _builtin(
        "snr",
        lambda s: s,
        eps_fn=lambda s: np.ones_like(s),
        v_fn=lambda s: 1.0 / (1.0 + 1.0 / s),
    )


def max_snr(gamma: float = 1.0) -> WeightingStrategy:
    """Max-SNR-gamma ("truncated SNR"), ``w = max(SNR, gamma)``."""
    _check_positive(gamma, "gamma")
    return _builtin(
        f"max_snr_{_fmt(gamma)}",
        lambda s: np.maximum(s, gamma),
        eps_fn=lambda s: np.maximum(1.0, gamma / s),
        v_fn=lambda s: np.maximum(s, gamma) / (s + 1.0),
    )


def min_snr(gamma: float = 5.0) -> WeightingStrategy:
    """Min-SNR-gamma (Hang et al. 2023), ``w = min(SNR, gamma)``; eps weight ``min(1, gamma/SNR)`` is 1 at SNR = 0."""
    _check_positive(gamma, "gamma")
    return _builtin(
        f"min_snr_{_fmt(gamma)}",
        lambda s: np.minimum(s, gamma),
        eps_fn=lambda s: np.minimum(1.0, gamma / s),
        v_fn=lambda s: np.minimum(s, gamma) / (s + 1.0),
    )


def soft_min_snr(gamma: float = 5.0) -> WeightingStrategy:
    """Soft Min-SNR, the harmonic mean form ``w = SNR * gamma / (SNR + gamma)`` (smooth version of min_snr)."""
    _check_positive(gamma, "gamma")
    return _builtin(
        f"soft_min_snr_{_fmt(gamma)}",
        lambda s: s * gamma / (s + gamma),
        eps_fn=lambda s: gamma / (s + gamma),
        v_fn=lambda s: gamma / ((1.0 + gamma / s) * (s + 1.0)),
    )


def inv_snr() -> WeightingStrategy:
    """Inverse SNR, ``w = 1 / SNR`` in x0 units (emphasises noisy timesteps)."""
    return _builtin("inv_snr", lambda s: 1.0 / s)


def p2(gamma: float = 1.0, k: float = 1.0) -> WeightingStrategy:
    """Perception-prioritized weighting (Choi et al. 2022): eps weight ``1 / (k + SNR)^gamma``,
    so ``w = SNR / (k + SNR)^gamma`` in x0 units."""
    _check_positive(k, "k")
    if not np.isfinite(gamma) or gamma < 0:
        raise ValueError(f"gamma must be finite and >= 0, got {gamma}")
    return _builtin(
        f"p2_{_fmt(gamma)}_{_fmt(k)}",
        lambda s: s / (k + s) ** gamma,
        eps_fn=lambda s: 1.0 / (k + s) ** gamma,
        v_fn=lambda s: (s / (k + s) ** gamma) / (s + 1.0),
    )


def custom(fn: Callable[[Any], Any], name: Optional[str] = None) -> WeightingStrategy:
    """Wrap a user function ``fn(snr) -> x0-unit weight``. ``fn`` receives a float64 array of SNR values
    (clamped into [SNR_MIN, SNR_MAX]); a function that only takes scalars is applied element by element."""
    if not callable(fn):
        raise TypeError(f"custom weighting needs a callable fn(snr) -> weight, got {type(fn).__name__}")

    def x0_fn(s: np.ndarray) -> np.ndarray:
        try:
            out = np.asarray(fn(s), dtype=np.float64)
            if out.shape not in (s.shape, ()):
                raise ValueError
            return np.broadcast_to(out, s.shape)
        except Exception:
            return np.vectorize(lambda v: float(fn(float(v))), otypes=[np.float64])(s)

    return WeightingStrategy(name or getattr(fn, "__name__", "custom"), x0_fn)


_REGISTRY: dict[str, Callable[..., WeightingStrategy]] = {
    "constant": constant,
    "snr": snr,
    "max_snr": max_snr,
    "min_snr": min_snr,
    "soft_min_snr": soft_min_snr,
    "inv_snr": inv_snr,
    "p2": p2,
}


def by_name(spec: str) -> WeightingStrategy:
    """Strategy from a string such as ``"min_snr"``, ``"min_snr:5"``, ``"max_snr_1"`` or ``"p2:1,1"``."""
    text = spec.strip().lower().replace("-", "_")
    name, _, args = text.partition(":")
    if not args:
        for key in sorted(_REGISTRY, key=len, reverse=True):
            if name.startswith(key + "_") and _is_number(name[len(key) + 1 :].split("_")[0]):
                name, args = key, name[len(key) + 1 :].replace("_", ",")
                break
    if name not in _REGISTRY:
        raise ValueError(f"unknown weighting {spec!r}; use one of {sorted(_REGISTRY)} (e.g. 'min_snr:5')")
    try:
        values = [float(a) for a in args.split(",") if a] if args else []
        return _REGISTRY[name](*values)
    except (TypeError, ValueError) as err:
        raise ValueError(f"bad weighting spec {spec!r}: {err}") from None


def as_strategy(strategy: Any) -> Any:
    """A name or spec (``"min_snr:5"``) -> :func:`by_name`; a plain function ``f(snr) -> x0-unit weight`` ->
    :func:`custom` (named by its ``__name__``); anything else as it is (a strategy object, or what its user checks)."""
    if isinstance(strategy, str):
        return by_name(strategy)
    if callable(strategy) and not hasattr(strategy, "weight"):
        return custom(strategy)
    return strategy


def check_unique_names(names: Sequence[str]) -> None:
    """Refuse a strategy name given twice: results are kept by name, so two ``"snr"`` (or two ``"<lambda>"``) would
    be averaged into one."""
    dup = sorted({n for n in names if list(names).count(n) > 1})
    if dup:
        raise ValueError(f"strategy name(s) {dup} appear more than once; give each strategy its own name, e.g. a dict "
                         "{'mine': f, ...} or weighting.custom(f, name='mine')")


def DEFAULT_STRATEGIES() -> list[WeightingStrategy]:
    """The paper's four fixed strategies: constant, SNR, Max-SNR-1 and Min-SNR-5."""
    return [constant(), snr(), max_snr(1.0), min_snr(5.0)]


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _check_positive(value: float, name: str) -> None:
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite positive number, got {value}")
