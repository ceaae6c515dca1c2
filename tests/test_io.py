"""Atomic writes and the folder lock: a writer killed outright leaves only a hidden temporary file, which the
next lock holder removes; the user's own files stay."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from gradconflict._io import folder_lock, write_text

_KILLED_WRITER = """
import os, signal, sys
from pathlib import Path
from gradconflict._io import atomic_write

def write(tmp: Path) -> None:
    tmp.write_text("half")
    os.kill(os.getpid(), signal.SIGKILL)  # as kill -9 or the OOM killer would, mid-write

atomic_write(Path(sys.argv[1]) / "sub" / "gram.csv", write)
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL") or sys.platform == "win32", reason="needs kill -9 and flock")
def test_a_killed_writer_leaves_no_result_and_its_temporary_file_is_removed_by_the_next_lock(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    run = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(tmp_path)], env=env, capture_output=True)
    assert run.returncode == -signal.SIGKILL, run.stderr.decode()
    sub = tmp_path / "sub"
    assert not (sub / "gram.csv").exists()  # nothing half-written under the real name
    orphans = [p.name for p in sub.iterdir()]
    assert len(orphans) == 1 and orphans[0].startswith(".gram.csv.gctmp-")
    mine = [sub / ".gram.csv.abcdefgh.csv", tmp_path / "notes.txt", sub / "gram-old.csv"]  # user files, dotfile too
    for path in mine:
        path.write_text("keep")
    with folder_lock(tmp_path):
        assert sorted(p.name for p in sub.iterdir()) == sorted(p.name for p in mine if p.parent == sub)
    assert all(path.read_text() == "keep" for path in mine)


def test_a_second_lock_on_a_held_folder_removes_nothing(tmp_path: Path) -> None:
    with folder_lock(tmp_path):
        pending = tmp_path / ".gram.csv.gctmp-abcd1234.csv"  # the holder's write in progress
        pending.write_text("writing")
        with pytest.raises(ValueError, match="in use by another gradconflict process"):
            with folder_lock(tmp_path):
                pass
        assert pending.exists()
        assert pending.exists()  # the refused second lock removed nothing
    write_text(tmp_path / "done.txt", "x")  # an atomic write leaves no temporary file of its own
    assert sorted(p.name for p in tmp_path.iterdir()) == [".gradconflict.lock", pending.name, "done.txt"]


def test_a_refused_rerun_names_what_differs_and_both_values(tmp_path: Path) -> None:
    """Inner keys by dotted name, a key missing on one side counts (it was read as no change), values shown."""
    from gradconflict._io import identity_changes, record_identity

    path = tmp_path / "config.json"
    record_identity(path, {"ugd_steps": 1000, "inputs": {"model": "m", "image_size": None}}, "results", "fix it")
    assert identity_changes(path, {"ugd_steps": 1000, "inputs": {"model": "m"}}) == ["inputs.image_size"]
    with pytest.raises(ValueError, match=r"differs in \['inputs.data', 'ugd_steps'\]: inputs.data: null recorded, "
                                         r"\"d\" now; ugd_steps: 1000 recorded, 10000 now\); fix it"):
        record_identity(path, {"ugd_steps": 10000, "inputs": {"model": "m", "image_size": None, "data": "d"}},
                        "results", "fix it")


def test_orphans_of_a_subfolder_whose_lock_is_held_are_left_to_its_holder(tmp_path: Path) -> None:
    """A lock on a folder does not exclude a command holding a lock on its subfolder: that one's temporary files
    are live writes."""
    sub = tmp_path / "track"
    with folder_lock(sub):
        live = sub / ".track_objectives.csv.gctmp-abcd1234.csv"
        live.write_text("writing")
        dead = tmp_path / ".gram.csv.gctmp-efgh5678.csv"
        dead.write_text("killed")
        with folder_lock(tmp_path):
            assert live.exists() and not dead.exists()
    with folder_lock(tmp_path):  # nobody holds the subfolder now: its leftover goes too
        assert not live.exists()
