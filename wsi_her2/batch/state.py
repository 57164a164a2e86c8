"""Per-slide state on disk and expiring per-slide locks, so cohort runs are resumable and never overlap.

Layout under the cohort output folder::

    state/<slide-id>.json   what happened to the slide (pending/running/done/failed, reason, row)
    state/<slide-id>.lock   who is working on it now (hostname, pid, token, heartbeat time)

State files are written atomically (temporary file + rename), only by the holder of the slide's
lock. A lock is taken by hard-linking a fully written temporary file to the lock name, which
fails if the name exists, so two runners (even on two hosts sharing the folder over NFS) cannot
both create it. The holder refreshes its heartbeat every ``timeout_s / 5`` seconds. Another
runner treats a lock as stale, and takes it over, when its heartbeat is older than its
``timeout_s``, or at once when it was written on this host by a process that no longer exists.
Takers serialise on a second, short-lived exclusive file (``<slide-id>.lock.takeover``) and
remove the stale lock only if it still is the one they judged, then compete to create theirs
like anyone else, so exactly one runner ends up holding the slide.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from wsi_her2.files import atomic_write_text
from wsi_her2.locks import (  # noqa: F401 (the cohort runner's lock API, re-exported)
    DEFAULT_LOCK_TIMEOUT_S, LockKeeper, LockOwner, SlideLock, acquire_lock, lock_staleness, read_lock,
)

log = logging.getLogger(__name__)

STATE_DIRNAME = "state"
#: Slide statuses as stored; ``status`` adds "running" (a live lock) and "stale" views on top.
STATUSES = ("pending", "running", "done", "failed")


@dataclass
class SlideState:
    """What is known about one slide of a cohort (one JSON file)."""

    slide_id: str
    status: str = "pending"
    stage: str | None = None  # "tile" | "score" while running; where it failed
    attempts: int = 0
    reason: str | None = None
    error_type: str | None = None
    retryable: bool = False  # a later run may try again (transient failure)
    input_key: str | None = None  # fingerprint of the slide file and its settings when last tried
    row: dict | None = None  # the slides.csv row once done
    n_tiles: int | None = None
    seconds: dict = field(default_factory=dict)
    updated: float = 0.0  # epoch seconds
    host: str | None = None
    pid: int | None = None

    @classmethod
    def from_dict(cls, data: dict) -> "SlideState":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def input_key(path: str | Path, *, mpp_um: float | None, extra: str = "") -> str:
    """Fingerprint of what a deterministic failure depends on: the file (size, mtime) and its settings."""
    from wsi_her2.errors import WsiHer2Error
    from wsi_her2.slide.identity import slide_stat

    path = Path(path)
    try:
        size, mtime_ns = slide_stat(path)  # a DICOM slide: all its files
        file_part = f"{size}:{mtime_ns}"
    except (OSError, WsiHer2Error):
        file_part = "missing"
    text = f"{path.resolve()}|{file_part}|{mpp_um}|{extra}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class StateStore:
    """Read and write ``<out_dir>/state/<slide-id>.json`` files and take their locks."""

    def __init__(self, out_dir: str | Path, *, lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S) -> None:
        self.out_dir = Path(out_dir)
        self.dir = self.out_dir / STATE_DIRNAME
        self.lock_timeout_s = float(lock_timeout_s)
        self.dir.mkdir(parents=True, exist_ok=True)

    def state_path(self, slide_id: str) -> Path:
        return self.dir / f"{slide_id}.json"

    def lock_path(self, slide_id: str) -> Path:
        return self.dir / f"{slide_id}.lock"

    def read(self, slide_id: str) -> SlideState | None:
        path = self.state_path(slide_id)
        try:
            return SlideState.from_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as exc:
            # a torn or hand-edited file: treat the slide as never processed rather than crash the run
            log.warning("%s: unreadable state file (%s); the slide will be processed again", path, exc)
            return None

    def write(self, state: SlideState) -> None:
        state.updated = time.time()
        state.host, state.pid = socket.gethostname(), os.getpid()
        atomic_write_text(self.state_path(state.slide_id), json.dumps(asdict(state), indent=1, sort_keys=True))

    def read_all(self) -> dict[str, SlideState]:
        out = {}
        for path in sorted(self.dir.glob("*.json")):
            state = self.read(path.stem)
            if state is not None:
                out[state.slide_id] = state
        return out

    def try_lock(self, slide_id: str, *, owner: "LockOwner | None" = None) -> "SlideLock | None":
        return acquire_lock(self.lock_path(slide_id), timeout_s=self.lock_timeout_s, owner=owner)

    def lock_info(self, slide_id: str) -> dict | None:
        return read_lock(self.lock_path(slide_id))
