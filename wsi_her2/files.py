"""Safe output paths: never delete what wsi-her2 did not write, one-line errors, atomic writes.

- :func:`prepare_output_dir` makes ``-o`` (or says in one line why it cannot: a file is in the
  way, no permission, ...); :func:`prepare_output_file` checks a file to write the same way.
- :func:`check_store_slot` refuses a store path that holds something wsi-her2 did not write
  (a user's directory or file), so ``--overwrite`` and "start over" only ever remove stores.
- :func:`atomic_write_bytes` writes to ``.<name>.<pid>.<thread>.tmp`` and renames; the file's
  mode follows the umask like every other output (``mkstemp`` would make it 0600), and
  :func:`clean_stale_tmp` removes the temporary files a killed run left behind.
- :func:`check_unique_slide_ids`: two slides of one call may not share a store name.
- :func:`pid_alive`: whether the process that wrote a temporary file (or a lock) still runs.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from wsi_her2.errors import ConfigError, OutputError

log = logging.getLogger(__name__)

STALE_TMP_S = 3600.0  # a temporary file this old is left over from a killed run, whoever wrote it
_TMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<host>[^.]+)\.(?P<pid>\d+)\.(?P<tid>\d+)\.tmp$")


def prepare_output_dir(path: str | Path, *, what: str = "output directory") -> Path:
    """Create ``path`` (and parents) as a writable directory, or raise one clear :class:`OutputError`."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{path}: {what} is a file, not a directory; choose another -o")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        raise OutputError(f"{path}: cannot create the {what}: a file is in the way ({exc.filename}); choose another -o") from exc
    except PermissionError as exc:
        raise OutputError(f"{path}: cannot create the {what}: permission denied; choose a writable -o") from exc
    except OSError as exc:
        raise OutputError(f"{path}: cannot create the {what} ({exc.strerror or exc}); choose another -o") from exc
    if not os.access(path, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: {what} is not writable; choose a writable -o")
    return path


def prepare_output_file(path: str | Path, *, what: str = "output file") -> Path:
    """Check that ``path`` can be written as a file (its folder made if need be) before any work is
    done for it, or raise one clear :class:`OutputError` (a folder in the way, no permission, ...)."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path}: the {what} is a folder, not a file; give the path of a file (in it, or elsewhere)")
    prepare_output_dir(path.parent, what=f"folder of the {what}")
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputError(f"{path}: the {what} exists and is not writable; choose another file")
    return path


def is_wsi_her2_store(path: Path) -> bool:
    """True when ``path`` is a zarr group carrying wsi-her2's attributes (complete or not)."""
    try:
        meta = json.loads((Path(path) / "zarr.json").read_text())
    except (OSError, ValueError):
        return False
    attrs = meta.get("attributes") if isinstance(meta, dict) else None
    return isinstance(attrs, dict) and isinstance(attrs.get("wsi_her2"), dict)


def _only_store_entries(path: Path, known_entries: frozenset[str]) -> bool:
    """An empty directory, or one holding nothing but a store's own entries (a store whose creation was cut short)."""
    try:
        names = {p.name for p in path.iterdir()}
    except OSError:
        return False
    return names <= known_entries | {"zarr.json"}


def check_store_slot(path: str | Path, *, known_entries: frozenset[str] = frozenset()) -> None:
    """Refuse ``path`` when something other than a wsi-her2 store is there (it must never be removed).

    A directory counts as a store when its ``zarr.json`` carries wsi-her2's attributes, or when it
    holds nothing but the names a store is made of (``known_entries``): a creation cut short.
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink() or not path.is_dir():
        raise OutputError(
            f"{path}: exists and is not a wsi-her2 patch store (a file or link); move it away or choose another -o"
        )
    if not is_wsi_her2_store(path) and not _only_store_entries(path, known_entries):
        raise OutputError(
            f"{path}: exists and is not a wsi-her2 patch store; it was left untouched: move it away or choose another -o"
        )


def check_unique_slide_ids(slides: Sequence[str | Path], id_for: Callable[[Path], str]) -> None:
    """Two inputs that would write the same ``<slide-id>.zarr`` are one error, before any work."""
    seen: dict[str, Path] = {}
    for slide in slides:
        sid = id_for(Path(slide))
        if sid in seen and Path(slide).resolve() != seen[sid].resolve():
            raise ConfigError(
                f"{seen[sid]} and {slide} would both be written to {sid}.zarr; tile them into different -o directories"
            )
        seen.setdefault(sid, Path(slide))


# --- atomic writes --------------------------------------------------------------------------------
def tmp_path_for(path: Path) -> Path:
    return path.with_name(f".{path.name}.{socket.gethostname().split('.')[0]}.{os.getpid()}.{threading.get_ident()}.tmp")


@contextlib.contextmanager
def atomic_target(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write; renamed onto ``path`` when the block succeeds,
    removed when it fails. Names are unique per host, process and thread (concurrent writers
    never share one), readers never see a half-written file."""
    path = Path(path)
    tmp = tmp_path_for(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary name; the mode follows the umask."""
    with atomic_target(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host still exists (one owned by another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return True
    return True


def _tmp_is_stale(path: Path, *, now: float) -> bool:
    m = _TMP_RE.match(path.name)
    try:
        age = now - path.stat().st_mtime
    except FileNotFoundError:
        return False
    if age > STALE_TMP_S:
        return True
    if m is None or m["host"] != socket.gethostname().split(".")[0]:
        return False
    return not pid_alive(int(m["pid"]))


def clean_stale_tmp(directory: str | Path, *, recursive: bool = False) -> int:
    """Remove temporary files (``.*.tmp``) a killed run left in ``directory``; returns how many."""
    directory = Path(directory)
    if not directory.is_dir():
        return 0
    now = time.time()
    found = directory.rglob(".*.tmp") if recursive else directory.glob(".*.tmp")
    removed = 0
    for path in found:
        if path.is_file() and _tmp_is_stale(path, now=now):
            path.unlink(missing_ok=True)
            removed += 1
    if removed:
        log.info("%s: removed %d temporary files left by an interrupted run", directory, removed)
    return removed


def remove_tmp_files(directory: str | Path) -> int:
    """Remove every ``.*.tmp`` file under ``directory`` (the caller holds its lock: all are left over)."""
    directory = Path(directory)
    if not directory.is_dir():
        return 0
    found = [p for p in directory.rglob(".*.tmp") if p.is_file()]
    for path in found:
        path.unlink(missing_ok=True)
    if found:
        log.info("%s: removed %d temporary files left by an interrupted run", directory, len(found))
    return len(found)
