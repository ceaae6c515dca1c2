"""The ``--out`` lock under races: a refused lock removes nothing, and never do two holders share one folder.

The interleavings are forced by hand (issue #15: two commands both find ``--out`` missing; the refused one's clean-up
used to delete the winner's lock file and folder, and a third command was then let in while the first still
wrote). ``flock`` conflicts between two open files of one process too, so threads stand in for processes there;
the last test races real processes.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import pytest

import gradconflict._io
from gradconflict._io import LOCK_NAME, folder_lock

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs flock")

WAIT = 10.0  # seconds a step of an interleaving may take before the test calls it stuck


class Holder(threading.Thread):
    """A ``folder_lock(folder)`` taken in its own thread (its own open file: ``flock`` treats it as another
    process), held until ``leave`` is set; ``error`` is the exception its lock raised, if any."""

    def __init__(self, folder: Path) -> None:
        super().__init__(daemon=True)
        self.folder, self.error = folder, None
        self.held, self.leave = threading.Event(), threading.Event()

    def run(self) -> None:
        try:
            with folder_lock(self.folder):
                self.held.set()
                assert self.leave.wait(WAIT)
        except BaseException as err:  # noqa: BLE001 - handed to the test
            self.error = err

    def finish(self) -> None:
        self.leave.set()
        self.join(WAIT)
        assert not self.is_alive()


def pause_first_call(monkeypatch, owner: object, name: str, who: threading.Thread, until: threading.Event,
                     reached: threading.Event) -> None:
    """Make thread ``who``'s first call of ``owner.name`` wait for ``until`` (``reached`` is set when it waits);
    every other call, and every other thread's, goes straight through."""
    real: Callable = getattr(owner, name)
    calls = []

    def gated(*args, **kwargs):
        if threading.current_thread() is who and not calls:
            calls.append(1)
            reached.set()
            assert until.wait(WAIT), "the interleaving got stuck"
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, gated)


def refused(folder: Path) -> bool:
    """Whether a lock on ``folder`` taken now is refused as in use."""
    try:
        with folder_lock(folder):
            return False
    except ValueError as err:
        assert "in use by another gradconflict process" in str(err)
        return True


def interleave(monkeypatch, folder: Path, owner: object, name: str) -> tuple[Holder, Optional[BaseException]]:
    """B starts on ``folder`` and stops at its first ``owner.name`` call; A takes the lock meanwhile (in this
    thread's stead, as a Holder); then B goes on. Returns A (still holding) and what B raised."""
    gate, reached = threading.Event(), threading.Event()
    b = Holder(folder)
    pause_first_call(monkeypatch, owner, name, b, gate, reached)
    b.start()
    assert reached.wait(WAIT)
    a = Holder(folder)
    a.start()
    assert a.held.wait(WAIT), a.error
    gate.set()
    b.join(WAIT)
    assert not b.is_alive() and not b.held.is_set()
    return a, b.error


def test_a_refused_lock_that_found_the_folder_missing_removes_nothing(tmp_path: Path, monkeypatch) -> None:
    """B looks, finds --out missing, and is paused before its mkdir; A makes --out and takes the lock; B is refused.
    A's folder and lock file survive B, and C is refused while A holds."""
    out = tmp_path / "runs" / "out"
    a, b_error = interleave(monkeypatch, out, Path, "mkdir")
    try:
        assert isinstance(b_error, ValueError) and "in use by another gradconflict process" in str(b_error)
        assert (out / LOCK_NAME).is_file()  # B's clean-up used to unlink it and remove the folder
        assert refused(out)  # ... and C was then let in while A still held the folder
    finally:
        a.finish()
    assert a.error is None
    assert not (tmp_path / "runs").exists()  # A made both folders and wrote nothing: A tidies them away


def test_a_refused_lock_that_made_the_lock_file_leaves_it_to_its_holder(tmp_path: Path, monkeypatch) -> None:
    """B makes --out and the lock file, and is paused before flock; A opens that file and takes the lock first.
    B is refused and must not remove the file it made: A holds it."""
    out = tmp_path / "out"
    a, b_error = interleave(monkeypatch, out, fcntl, "flock")
    try:
        assert isinstance(b_error, ValueError) and "in use by another gradconflict process" in str(b_error)
        assert (out / LOCK_NAME).is_file()
        assert refused(out)
    finally:
        a.finish()
    assert a.error is None
    assert not refused(out)  # free again once A is gone


def test_a_waiter_on_the_lock_file_its_holder_removed_takes_a_fresh_one(tmp_path: Path, monkeypatch) -> None:
    """A holds a folder it made; C opens A's lock file and is paused before flock; A leaves (removing its lock file
    and folder). C's flock on the removed file succeeds: C must notice and lock the folder anew, so that D is
    refused while C holds (C and D used to hold two different lock files on one folder)."""
    out = tmp_path / "out"
    a = Holder(out)
    a.start()
    assert a.held.wait(WAIT)
    gate, reached = threading.Event(), threading.Event()
    c = Holder(out)
    pause_first_call(monkeypatch, fcntl, "flock", c, gate, reached)
    c.start()
    assert reached.wait(WAIT)
    a.finish()
    assert a.error is None and not out.exists()  # A tidied its folder away under C's feet
    gate.set()
    assert c.held.wait(WAIT), c.error
    try:
        assert (out / LOCK_NAME).is_file()
        assert refused(out)  # D
    finally:
        c.finish()
    assert c.error is None and not out.exists()  # C made the folder anew, wrote nothing: tidied


_CONTENDER = r"""
import importlib.util, os, random, sys, time
from pathlib import Path

base, log, me, rounds, period, hold, source = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), \
    float(sys.argv[5]), float(sys.argv[6]), sys.argv[7]
spec = importlib.util.spec_from_file_location("gradconflict_io", source)  # the module alone: no torch to import
io = importlib.util.module_from_spec(spec)
spec.loader.exec_module(io)
LOCK_NAME, folder_lock = io.LOCK_NAME, io.folder_lock
fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
say = lambda *w: os.write(fd, (" ".join(map(str, w)) + "\n").encode())  # one append each: lines never mix
(base / f"ready-{me}").touch()
while not (base / "go").exists():
    time.sleep(0.002)
start = float((base / "go").read_text())
random.seed(me)
for r in range(rounds):
    out = base / f"round{r}" / "out"  # two levels missing at the start of every round
    opens = start + r * period
    time.sleep(max(0.0, opens - time.time()))
    while time.time() < opens + 0.6 * period:
        try:
            with folder_lock(out):
                say("acquire", r, me, time.monotonic_ns())
                time.sleep(hold)
                intact = (out / LOCK_NAME).is_file()
                say("release", r, me, time.monotonic_ns(), int(intact))
            break
        except ValueError:
            time.sleep(random.uniform(0, 0.002))  # refused: try again, as a third command would
"""


def test_real_processes_never_share_a_folder(tmp_path: Path) -> None:
    """Three processes race for the lock on a fresh two-level folder, 25 rounds, retrying while refused: the holds
    never overlap, and no holder's lock file (or folder) vanishes while it holds it."""
    rounds, period, hold, n = 25, 0.12, 0.02, 3
    log = tmp_path / "log.txt"
    source = str(Path(gradconflict._io.__file__).resolve())
    procs = [subprocess.Popen([sys.executable, "-c", _CONTENDER, str(tmp_path), str(log), str(i), str(rounds),
                               str(period), str(hold), source], stderr=subprocess.PIPE) for i in range(n)]
    try:
        deadline = time.time() + 60
        while not all((tmp_path / f"ready-{i}").exists() for i in range(n)):
            assert time.time() < deadline and all(p.poll() is None for p in procs), "a contender did not start"
            time.sleep(0.01)
        (tmp_path / "go.tmp").write_text(repr(time.time() + 0.05))
        os.replace(tmp_path / "go.tmp", tmp_path / "go")  # atomic: a contender never reads a half-written start time
        for p in procs:
            _, err = p.communicate(timeout=60)
            assert p.returncode == 0, err.decode()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    holds: dict[int, list[tuple[int, int, int]]] = {}
    acquired: dict[tuple[int, int], int] = {}
    for line in log.read_text().splitlines():
        kind, r, me, t, *rest = line.split()
        if kind == "acquire":
            acquired[int(r), int(me)] = int(t)
        else:
            assert rest == ["1"], f"round {r}: process {me}'s lock file vanished while it held it"
            holds.setdefault(int(r), []).append((acquired.pop((int(r), int(me))), int(t), int(me)))
    assert not acquired and len(holds) == rounds  # every round had a holder, and every hold ended
    for r, spans in holds.items():
        spans.sort()
        for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
            assert begin > end, f"round {r}: processes {first} and {second} held the folder at once"
