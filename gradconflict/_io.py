"""Atomic file writes: every result file is written to a temporary file in its folder, then renamed.

An interrupted run therefore never leaves a half-written CSV, checkpoint or figure behind. A process killed
outright (``kill -9``, out of memory) may leave its hidden temporary file (``.NAME.gctmp-XXXXXXXX.SUFFIX``); the
next command that locks the folder (``folder_lock``) removes those.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import pandas as pd

__all__ = ["atomic_write", "write_csv", "write_json", "write_text", "as_json", "identity_changes", "record_identity",
           "fingerprint", "folder_lock"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


TMP_MARK = ".gctmp-"  # in the name of every temporary file atomic_write makes (mkstemp adds 8 random characters)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary path next to ``path`` (same suffix, so writers that look at it, like
    ``np.savez`` or ``savefig``, behave), flush it to disk (``fsync``: a power loss cannot leave an empty file
    behind the rename) and move it into place with ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}{TMP_MARK}", suffix=path.suffix or ".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "r+b") as handle:  # write access: Windows' fsync (_commit) needs it
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def write_csv(frame: pd.DataFrame, path: str | Path, index: bool = False) -> Path:
    """Write a DataFrame as CSV atomically."""
    return atomic_write(path, lambda p: frame.to_csv(p, index=index))


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented, key-sorted JSON atomically."""
    return atomic_write(path, lambda p: p.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n"))


def as_json(data: Any) -> Any:
    """``data`` as it reads back after ``write_json`` (tuples become lists, other objects strings)."""
    return json.loads(json.dumps(data, default=str))


def identity_changes(path: str | Path, identity: dict[str, Any]) -> Optional[list[str]]:
    """The keys in which the identity recorded at ``path`` differs from ``identity``; None when none is recorded."""
    path = Path(path)
    if not path.is_file():
        return None
    old, new = json.loads(path.read_text()), as_json(identity)
    return sorted(_differences(old, new))


def _differences(old: dict, new: dict) -> dict[str, tuple[Any, Any]]:
    """``key -> (recorded, now)`` for the keys that differ (a key missing on one side too), inner dicts by
    dotted key ("inputs.data", not "inputs"). ``_names`` (at any level: readable names of the values beside it,
    e.g. a data path beside its content hash) is shown in a refusal but never compared."""
    out: dict[str, tuple[Any, Any]] = {}
    missing = object()
    for k in (set(old) | set(new)) - {NAMES}:
        a, b = old.get(k, missing), new.get(k, missing)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out.update({f"{k}.{sub}": pair for sub, pair in _differences(a, b).items()})
        else:
            out[k] = (None if a is missing else a, None if b is missing else b)
    return out


NAMES = "_names"


def _named(identity: dict, key: str) -> str:
    """`` (name)`` for the dotted ``key`` of ``identity`` when a ``_names`` beside it names its value, else ''."""
    *parents, leaf = key.split(".")
    node: Any = identity
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    name = node.get(NAMES, {}).get(leaf) if isinstance(node, dict) and isinstance(node.get(NAMES), dict) else None
    return f" ({name})" if name else ""


def record_identity(path: str | Path, identity: dict[str, Any], holds: str, fix: str) -> None:
    """Record what a folder's results depend on at ``path``, or raise ``ValueError`` when a different identity is
    recorded there: "<folder> holds <holds> (differs in [keys]); <fix>"."""
    path = Path(path)
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, as_json(identity))
        return
    recorded, now = json.loads(path.read_text()), as_json(identity)
    values = _differences(recorded, now)
    if values:
        diff = sorted(values)
        shown = "; ".join(f"{k}: {_short(values[k][0])}{_named(recorded, k)} recorded, {_short(values[k][1])}"
                          f"{_named(now, k)} now" for k in diff[:3])
        raise ValueError(f"{path.parent} holds {holds} (differs in {diff}: {shown}); {fix}")


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def write_text(path: str | Path, text: str) -> Path:
    """Write text atomically."""
    return atomic_write(path, lambda p: p.write_text(text))


LOCK_NAME = ".gradconflict.lock"


@contextlib.contextmanager
def folder_lock(folder: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (created if missing) for the duration: a second gradconflict process
    writing results there gets a ``ValueError`` at once instead of overwriting them (``flock`` on
    ``folder/.gradconflict.lock``, released when the process ends, even when killed; no lock where the OS has no
    ``fcntl``). Once the lock is held, temporary files that a killed writer left in the folder tree are removed.

    A refused call removes nothing (the folder and lock file it finds are another process's, even where this call
    made them a moment before: that one may hold them now). The holder, on leaving, removes the lock file and the
    folders that it itself created, when nothing else was written there."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    folder = Path(folder)
    created: list[Path] = []  # the folders this call made (mkdir succeeded), deepest first
    for _ in range(_LOCK_TRIES):
        created = _make_folders(folder) + created
        lock = folder / LOCK_NAME
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
        except FileNotFoundError:  # a holder removed the folder it made between our mkdir and open: again
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ValueError(f"{folder} is in use by another gradconflict process (it holds {lock}); wait for it "
                             "to finish, or use another --out") from None
        except OSError:  # a filesystem without flock (NFS without lockd, Lustre without -o flock): run unlocked
            locked = False
        else:
            locked = True
            if not _same_file(fd, lock):  # the previous holder removed this lock file on leaving: lock the new one
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
                continue
        break
    else:  # pragma: no cover - only under a storm of holders coming and going
        raise ValueError(f"{folder}: could not take its lock {folder / LOCK_NAME} in {_LOCK_TRIES} tries; "
                         "wait for the other gradconflict processes there to finish, or use another --out")
    try:
        if locked:  # no other gradconflict process writes here now: what temporary files remain are orphans
            _remove_orphans(folder)
        yield
    finally:
        try:  # the folders this call made and nothing else wrote to are removed again, the lock file first
            made_here = bool(created) and created[0] == folder and folder.is_dir()
            if made_here and [p.name for p in folder.iterdir()] == [LOCK_NAME]:
                lock.unlink()  # (still locked: a waiter that opened it finds it gone from the path and retries)
                for made in created:
                    try:
                        made.rmdir()
                    except OSError:  # something else was written there meanwhile
                        break
        finally:
            if locked:
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


_LOCK_TRIES = 100


def _make_folders(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; return the ones this call created (its ``mkdir`` succeeded,
    not another process's), deepest first."""
    missing = [f for f in (folder, *folder.parents) if not f.exists()]
    made = []
    for f in reversed(missing):  # the outermost first
        try:
            f.mkdir()
        except FileExistsError:  # another process made it between our look and our mkdir: it is theirs
            continue
        except FileNotFoundError:  # a folder on the way was removed meanwhile (its maker left): not ours either
            break
        made.append(f)
    for _ in range(_LOCK_TRIES):  # (a folder on the way removed meanwhile: make it, not ours)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            break
        except FileExistsError:  # made by another process and removed by it between mkdir's two looks: again
            continue
    return made[::-1]


def _same_file(fd: int, path: Path) -> bool:
    """Whether the open file ``fd`` is still the file at ``path`` (not removed or replaced since it was opened)."""
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (now.st_dev, now.st_ino)


def _remove_orphans(folder: Path) -> None:
    """Remove the temporary files of killed writers under ``folder`` (locked by this process), skipping subfolders
    whose own lock another command holds now (its writes are live)."""
    import fcntl

    for root, dirs, files in os.walk(folder):
        here = Path(root)
        if here != folder and LOCK_NAME in files:
            try:
                probe = os.open(here / LOCK_NAME, os.O_RDONLY)  # no O_CREAT: a lock file gone meanwhile stays gone
                try:
                    fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    fcntl.flock(probe, fcntl.LOCK_UN)
                finally:
                    os.close(probe)
            except FileNotFoundError:  # its holder left and removed it: nobody holds it
                pass
            except OSError:  # held (or unlockable): leave this subtree to its holder
                dirs.clear()
                continue
        for name in files:
            if name.startswith(".") and TMP_MARK in name and not (here / name).is_symlink():
                with contextlib.suppress(OSError):
                    (here / name).unlink()


def fingerprint(tensors: Iterable[Any]) -> str:
    """SHA-256 of the tensors' shapes, dtypes and bytes, in order (hex, 16 characters); None entries (e.g. absent
    labels) are skipped."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for t in tensors:
        if t is None:
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]
