"""Atomic file writes: write to a temporary file in the same folder, then rename over the target.

A reader (or a resumed run) never sees half a file, whatever kills the writer.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` (with normal file permissions)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name, suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes (read in 1 MiB chunks)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


# -- output-folder locks --------------------------------------------------------------------------------------
LOCK_NAME = ".mwm.lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def _read_lock(path: Path) -> dict:
    import json

    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


def _lock_is_stale(info: dict) -> bool:
    """A lock whose writer is gone: same host and its pid no longer runs (a lock from another host is trusted)."""
    import socket

    pid = info.get("pid")
    if not isinstance(pid, int):
        return True  # unreadable or half-written lock file: its writer died before finishing it
    return info.get("host") == socket.gethostname() and not _pid_alive(pid)


@contextlib.contextmanager
def lock_folder(folder: str | Path, name: str = LOCK_NAME, what: str = "run", wait_s: float = 0) -> Iterator[Path]:
    """Hold an exclusive lock on an output folder for the duration of a job.

    The lock is a file ``folder/name`` created with ``O_CREAT | O_EXCL`` holding the pid, host, start time and
    command line. A second job into the same folder gets an :class:`MWMError` naming the process that holds it;
    a lock left by a process that no longer runs (same host) is taken over. Written by hand: ``filelock`` and
    ``fcntl`` locks vanish with their process and cannot name the holder, which is the message users need.

    Args:
        folder: the output folder (created when missing).
        name: the lock file's name (sharded jobs lock ``.mwm.lock-<shard>`` so shards run side by side).
        what: the job taking the lock, named to whoever finds it held ("localize run", "pretraining run").
        wait_s: wait up to this long for a live holder to let go (a short critical section shared by the
            shards of one job), instead of failing at once.

    Returns:
        A context manager yielding the lock file's path; the file is removed on exit.
    """
    import json
    import socket
    import sys
    import time

    from .errors import MWMError

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise MWMError(f"--out {folder} is a file, not a folder; give a folder path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MWMError(f"cannot create the output folder {folder} ({e.strerror}); choose a writable --out") from e
    path = folder / name
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
          "command": " ".join(sys.argv)[:500], "what": what}
    deadline, takeovers = time.time() + wait_s, 0
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            info = _read_lock(path)
            if not info and time.time() - _mtime(path) < 2:
                time.sleep(0.2)  # another process is writing its lock right now
                info = _read_lock(path)
            if _lock_is_stale(info):
                takeovers += 1
                if takeovers > 3:
                    raise MWMError(f"could not take the lock {path}; another process keeps re-creating it") from None
                _remove_if_same(path, info)
                continue
            if time.time() < deadline:
                time.sleep(min(2.0, max(0.05, deadline - time.time())))
                continue
            raise MWMError(f"{folder} is in use by another {info.get('what', 'run')}: {describe_holder(info)}. Wait "
                           f"for it to finish, or choose another --out; if that process is gone, delete {path}"
                           ) from None
        except OSError as e:  # PermissionError, a read-only file system, …
            raise MWMError(f"cannot write in {folder} ({e.strerror}); choose a writable --out") from e
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(me))
        break
    try:
        yield path
    finally:
        if _read_lock(path).get("pid") == me["pid"]:
            with contextlib.suppress(OSError):
                os.remove(path)


def lock_holder(path: str | Path) -> dict | None:
    """Who holds the lock file ``path``: its info dict (``{}`` while a new lock is still being written), or None
    when the file is absent or its holder is gone (a stale lock)."""
    path = Path(path)
    if not path.is_file():
        return None
    info = _read_lock(path)
    if not info:
        import time

        return {} if time.time() - _mtime(path) < 2 else None
    return None if _lock_is_stale(info) else info


def shard_lock_name(shard: tuple[int, int]) -> str:
    """The lock file of shard ``(i, n)`` of a job: shards of one job share a folder, each with its own lock."""
    i, n = shard
    return LOCK_NAME if n == 1 else f"{LOCK_NAME}-shard-{i}-of-{n}"


def live_locks(folder: str | Path, except_name: str) -> list[tuple[Path, dict]]:
    """The other lock files in ``folder`` whose holder still runs (a lock being written right now counts,
    with ``{}`` as its info)."""
    held = [(p, lock_holder(p)) for p in sorted(Path(folder).glob(LOCK_NAME + "*")) if p.name != except_name]
    return [(p, info) for p, info in held if info is not None]


def describe_holder(info: dict) -> str:
    """``pid 12 on host (started …: command)`` for a lock's info."""
    if not info:
        return "a process that is starting now"
    return f"pid {info.get('pid')} on {info.get('host')} (started {info.get('started')}: {info.get('command', '?')})"


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _remove_if_same(path: Path, info: dict) -> None:
    """Remove a stale lock only if it still holds what we read (another taker may have replaced it)."""
    if _read_lock(path) == info:
        with contextlib.suppress(OSError):
            os.remove(path)
