"""Expiring exclusive locks on files, safe across processes and hosts sharing a folder (NFS).

A lock is taken by hard-linking a fully written temporary file to the lock name, which fails if
the name exists, so two runners (even on two hosts) cannot both create it. The holder refreshes
its heartbeat every ``timeout_s / 5`` seconds. Another runner treats a lock as stale, and takes
it over, when its heartbeat is older than its ``timeout_s``, or at once when it was written on
this host by a process that no longer exists. Takers serialise on a second, short-lived
exclusive file (``<name>.takeover``) and remove the stale lock only if it still is the one they
judged, then compete to create theirs like anyone else, so exactly one ends up holding it.
Used by the cohort runner (one runner per slide) and by ``wsi-her2 tile`` (one run per store).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from wsi_her2.errors import OutputError, StoreError
from wsi_her2.files import atomic_write_text, pid_alive, tmp_path_for

log = logging.getLogger(__name__)

DEFAULT_LOCK_TIMEOUT_S = 300.0
STORE_LOCK_TIMEOUT_S = 120.0
_TAKEOVER_MUTEX_STALE_S = 30.0


# --- locks ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LockOwner:
    """Identifies one runner: host and process, plus a token (two runners may share a process)."""

    hostname: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    token: str = field(default_factory=lambda: uuid.uuid4().hex)


def read_lock(path: Path) -> dict | None:
    """The lock's content, ``{}`` if it exists but cannot be parsed, ``None`` if there is no lock."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        info = json.loads(text)
        return info if isinstance(info, dict) else {}
    except ValueError:
        return {}


def lock_staleness(path: Path, info: dict | None, *, timeout_s: float, now: float | None = None) -> str | None:
    """Why the lock at ``path`` is stale, or ``None`` while its owner looks alive."""
    if info is None:
        return None
    now = time.time() if now is None else now
    timeout = float(info.get("timeout_s") or timeout_s)
    beat = info.get("heartbeat")
    if beat is None:  # unparseable content: judge by the file's age
        try:
            beat = path.stat().st_mtime
        except FileNotFoundError:
            return None
    age = now - float(beat)
    if age > timeout:
        return f"no heartbeat for {age:.0f} s (timeout {timeout:.0f} s)"
    if info.get("hostname") == socket.gethostname() and info.get("pid") and not pid_alive(int(info["pid"])):
        return f"process {info['pid']} on this host is gone"
    return None


def _lock_content(owner: LockOwner, *, timeout_s: float, acquired: float | None = None) -> str:
    now = time.time()
    return json.dumps({
        "hostname": owner.hostname, "pid": owner.pid, "token": owner.token,
        "acquired": acquired or now, "heartbeat": now, "timeout_s": timeout_s,
    })


def _create_exclusive(path: Path, content: str) -> bool:
    # The temporary file is named like every other one (host, pid, thread: files.tmp_path_for), so
    # the stale-file cleanup recognises one a killed process left; it is written inside the ``try``,
    # so a failed write (a full disk) never leaves it behind.
    tmp = tmp_path_for(path)
    try:
        tmp.write_text(content)
        try:
            os.link(tmp, path)  # atomic and fails if the name exists, also on NFS
            return True
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links: O_EXCL instead (brief empty-file window)
            return _create_with_o_excl(path, content)
    finally:
        tmp.unlink(missing_ok=True)


def _create_with_o_excl(path: Path, content: str) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(content)
    except BaseException:
        path.unlink(missing_ok=True)  # ours, half written: a full disk must not leave a lock nobody holds
        raise
    return True


class SlideLock:
    """A held lock; refresh with :meth:`heartbeat`, give back with :meth:`release`."""

    def __init__(self, path: Path, owner: LockOwner, *, timeout_s: float, acquired: float) -> None:
        self.path = path
        self.owner = owner
        self.timeout_s = timeout_s
        self.acquired = acquired
        self.lost = False

    def held(self) -> bool:
        info = read_lock(self.path)
        return bool(info) and info.get("token") == self.owner.token

    def heartbeat(self) -> bool:
        """Refresh the heartbeat; ``False`` (and :attr:`lost`) if another runner took the lock over."""
        if self.lost:
            return False
        if not self.held():
            self.lost = True
            log.warning("%s: lock was taken over by another runner (our heartbeat was late)", self.path)
            return False
        atomic_write_text(self.path, _lock_content(self.owner, timeout_s=self.timeout_s, acquired=self.acquired))
        return True

    def release(self) -> None:
        if self.held():
            self.path.unlink(missing_ok=True)


def acquire_lock(path: str | Path, *, timeout_s: float = DEFAULT_LOCK_TIMEOUT_S, owner: LockOwner | None = None) -> SlideLock | None:
    """Take the lock at ``path``, taking over a stale one; ``None`` if a live owner holds it."""
    path = Path(path)
    owner = owner or LockOwner()
    for _ in range(3):
        now = time.time()
        if _create_exclusive(path, _lock_content(owner, timeout_s=timeout_s, acquired=now)):
            return SlideLock(path, owner, timeout_s=timeout_s, acquired=now)
        info = read_lock(path)
        if info is None:
            continue  # released between our attempt and our look: try again
        if info.get("token") == owner.token:
            return SlideLock(path, owner, timeout_s=timeout_s, acquired=float(info.get("acquired", now)))
        why = lock_staleness(path, info, timeout_s=timeout_s)
        if why is None:
            return None
        if not _remove_stale(path, info):
            return None
        log.info("%s: took over a stale lock of %s:%s (%s)", path.name, info.get("hostname"), info.get("pid"), why)
    return None


def _remove_stale(path: Path, judged: dict) -> bool:
    """Remove the lock judged stale, unless it changed since; ``False`` if someone else is taking it over.

    Takers serialise on ``<lock>.takeover`` (created exclusively), so no taker can remove a
    lock another taker has just created. Creators never race with a removal: they only create
    when no lock file exists.
    """
    mutex = path.with_name(f"{path.name}.takeover")
    if not _create_exclusive(mutex, json.dumps({"pid": os.getpid(), "hostname": socket.gethostname()})):
        try:  # a taker that died inside this few-millisecond window leaves the mutex behind
            if time.time() - mutex.stat().st_mtime > _TAKEOVER_MUTEX_STALE_S:
                mutex.unlink(missing_ok=True)
        except FileNotFoundError:
            pass
        return False
    try:
        if read_lock(path) != judged:  # refreshed, released or replaced since we judged it
            return False
        path.unlink(missing_ok=True)
        return True
    finally:
        mutex.unlink(missing_ok=True)


class LockKeeper:
    """Refreshes the heartbeat of every lock it holds from a background thread."""

    def __init__(self, *, interval_s: float) -> None:
        self.interval_s = max(0.05, float(interval_s))
        self._locks: dict[str, SlideLock] = {}
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="wsi-her2-lock-heartbeat", daemon=True)

    def __enter__(self) -> "LockKeeper":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def add(self, slide_id: str, lock: SlideLock) -> None:
        with self._mutex:
            self._locks[slide_id] = lock

    def release(self, slide_id: str) -> None:
        with self._mutex:
            lock = self._locks.pop(slide_id, None)
        if lock is not None:
            lock.release()

    def release_all(self) -> None:
        for slide_id in list(self._locks):
            self.release(slide_id)

    def lost(self, slide_id: str) -> bool:
        lock = self._locks.get(slide_id)
        return lock is None or lock.lost

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            with self._mutex:
                locks = list(self._locks.values())
            for lock in locks:
                try:
                    lock.heartbeat()
                except OSError as exc:  # a flaky network file system: try again next beat
                    log.warning("%s: heartbeat failed (%s)", lock.path, exc)


@contextlib.contextmanager
def held(path: str | Path, *, wait_s: float = 60.0, timeout_s: float = 30.0) -> Iterator[None]:
    """Hold the lock at ``path`` for a short read-modify-write, waiting up to ``wait_s`` for a
    live holder (a dead one's lock is taken over at once, an expired one after ``timeout_s``)."""
    deadline = time.monotonic() + wait_s
    while (lock := acquire_lock(path, timeout_s=timeout_s)) is None:
        if time.monotonic() > deadline:
            raise OutputError(f"{path}: still locked by another writer after {wait_s:.0f} s; if none runs, delete the lock file")
        time.sleep(0.02)
    try:
        yield
    finally:
        lock.release()


# --- one tile run per store ------------------------------------------------------------------------
def store_lock_path(store_path: Path) -> Path:
    return store_path.with_name(f"{store_path.name}.lock")


@contextlib.contextmanager
def store_lock(store_path: str | Path, *, timeout_s: float = STORE_LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold ``<store>.lock`` while writing the store; another live holder is one clear :class:`StoreError`.

    The lock is the expiring lock the cohort runner takes on each slide (:func:`acquire_lock`): its
    heartbeat is refreshed in the background, and a lock left by a killed process is taken over at
    once on the same host, or after ``timeout_s`` without a heartbeat from another host.
    """
    path = store_lock_path(Path(store_path))
    lock = acquire_lock(path, timeout_s=timeout_s)
    if lock is None:
        info = read_lock(path) or {}
        raise StoreError(
            f"{store_path}: another wsi-her2 run ({info.get('hostname', '?')}, pid {info.get('pid', '?')}) is writing "
            f"this store; wait for it to finish, or stop it and re-run (its lock {path.name} expires "
            f"{timeout_s:.0f} s after it stops)"
        )
    keeper = LockKeeper(interval_s=timeout_s / 5)
    keeper.add("store", lock)
    with keeper:
        try:
            yield
        finally:
            keeper.release_all()
