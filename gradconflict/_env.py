"""Settings read from environment variables (switches for benchmarks and for paths a user may turn off)."""

from __future__ import annotations

import os
from typing import Optional, Sequence

__all__ = ["env_choice"]


def env_choice(name: str, default: str, choices: Sequence[str], allowed: Optional[str] = None) -> str:
    """The value of environment variable ``name`` (stripped, lower case; ``default`` when unset), or a ValueError
    "<name> must be <allowed>, got ..." when it is not one of ``choices`` (``allowed``: how to name the valid
    values, by default ``'a', 'b' or 'c'``)."""
    value = os.environ.get(name, default).strip().lower()
    if value not in choices:
        quoted = [repr(c) for c in choices]
        allowed = allowed or (", ".join(quoted[:-1]) + " or " + quoted[-1] if len(quoted) > 1 else quoted[0])
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return value
