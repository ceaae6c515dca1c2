"""The ``path/to/file.py:function`` and ``package.module:function`` model specs: import the user's code, call the
function under a fixed seed, and report any error in it in one line naming its file and line.

The function returns ``(model, schedule, prediction)`` (a diffusers scheduler is accepted as the schedule), or
just a model (then the linear schedule, T = 1000, and eps prediction are assumed, with a note).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
import traceback
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.nn as nn

from ..schedule import NoiseSchedule
from ..targets import normalize_prediction
from .loaded import LoadedModel

__all__ = ["call_user", "import_function", "load_user_function"]


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


def import_function(spec: str) -> Any:
    """The function named by ``spec`` (``path/file.py:function`` or ``module:function``), its module imported as
    ``python file.py`` / ``python -m`` would (its folder, or the current one, on ``sys.path``)."""
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


def load_user_function(text: str, seed: int, verbose: bool = True) -> LoadedModel:
    """Call the function of the spec ``text`` with torch seeded by ``seed`` (the global RNG is left untouched) and
    wrap what it returns: ``(model, schedule, prediction)`` or a model alone (linear schedule, eps)."""
    build = import_function(text)
    with torch.random.fork_rng(devices=[]):  # the same initial weights in every run; global RNG untouched
        torch.manual_seed(seed)
        target = text.rpartition(":")[0]
        user_file = Path(target).resolve() if target.endswith(".py") else None
        with call_user(text, f"calling {text.rpartition(':')[2]}()", user_file, target):
            made = build()
    if isinstance(made, nn.Module):
        if verbose:
            print(f"note: {text} returned a model alone, so the linear schedule (T = 1000) and eps prediction "
                  "are assumed; return (model, schedule, prediction) if it was trained otherwise", file=sys.stderr)
        return LoadedModel(made, NoiseSchedule.linear(), "eps", text)
    if isinstance(made, (tuple, list)) and len(made) == 3:
        model, schedule, prediction = made
        if not isinstance(model, nn.Module):
            raise ValueError(f"{text!r} returned a {type(model).__name__} as its model; return the "
                             "torch.nn.Module (a plain function has no parameters to take gradients of)")
        if not isinstance(schedule, NoiseSchedule):
            schedule = NoiseSchedule.from_diffusers(schedule)
        return LoadedModel(model, schedule, normalize_prediction(prediction), text)
    got = f"a {type(made).__name__} of {len(made)} items" if isinstance(made, (tuple, list)) else \
        f"a {type(made).__name__}"
    raise ValueError(f"{text!r} must return an nn.Module or (model, schedule, prediction), got {got}")
