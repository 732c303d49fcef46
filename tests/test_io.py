"""Output-folder locks: one job per folder, a clear error naming the holder, stale locks taken over."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from mwm.errors import MWMError
from mwm.io import LOCK_NAME, lock_folder


def test_second_lock_fails_naming_the_holder(tmp_path):
    with lock_folder(tmp_path, what="pretraining run") as p:
        info = json.loads(p.read_text())
        assert info["pid"] == os.getpid()
        with pytest.raises(MWMError, match=rf"in use by another pretraining run: pid {os.getpid()}"):
            with lock_folder(tmp_path):
                pass
    assert not (tmp_path / LOCK_NAME).exists()  # released
    with lock_folder(tmp_path):  # and can be taken again
        pass


def test_stale_lock_of_a_dead_pid_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    with lock_folder(tmp_path) as p:
        assert json.loads(p.read_text())["pid"] == os.getpid()


def _holder(folder, seconds: float) -> subprocess.Popen:
    """Another interpreter that holds ``folder``'s lock for ``seconds`` (returned once it holds it)."""
    code = ("import sys,time; from mwm.io import lock_folder\n"
            f"with lock_folder(sys.argv[1]):\n print('locked', flush=True); time.sleep({seconds})")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_lock_of_a_live_process_in_another_interpreter_blocks(tmp_path):
    proc = _holder(tmp_path, 30)
    try:
        with pytest.raises(MWMError, match=f"pid {proc.pid}"):
            with lock_folder(tmp_path):
                pass
    finally:
        proc.kill()
        proc.wait()
    with lock_folder(tmp_path):  # the killed holder's lock is stale now
        pass


def test_out_that_is_a_file_or_read_only(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(MWMError, match="is a file, not a folder"):
        with lock_folder(f):
            pass


def test_read_only_out_is_a_clear_error(tmp_path, monkeypatch):
    # root ignores folder permissions, so the refusal is simulated where the lock file is created
    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("mwm.io.os.open", refuse)
    with pytest.raises(MWMError, match="cannot write in .*Permission denied.*choose a writable --out"):
        with lock_folder(tmp_path / "ro"):
            pass


def test_wait_for_a_held_lock(tmp_path):
    proc = _holder(tmp_path, 1.5)
    try:
        with pytest.raises(MWMError):
            with lock_folder(tmp_path, wait_s=0.3):  # still held after 0.3 s
                pass
        with lock_folder(tmp_path, wait_s=30) as p:  # taken once the holder lets go
            assert json.loads(p.read_text())["pid"] == os.getpid()
    finally:
        proc.kill()
        proc.wait()
