"""The temporary file a lock is made from never outlives a failed write (a full disk), and one a
killed process left is recognised by the stale-file cleanup."""
from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from wsi_her2.files import clean_stale_tmp
from wsi_her2.outputs.tables import upsert_slides_csv


def test_full_disk_while_taking_the_lock_leaves_no_temporary_file(tmp_path, monkeypatch):
    real_write_text = Path.write_text

    def disk_full(self, data, *args, **kwargs):
        if ".lock." in self.name and self.name.endswith(".tmp"):
            real_write_text(self, data[:5])  # the file exists, half written, when the disk fills up
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write_text(self, data, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", disk_full)
    with pytest.raises(OSError, match="No space left"):
        upsert_slides_csv(tmp_path / "slides.csv", [{"slide": "s"}])
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_full_disk_in_the_no_hard_link_fallback_leaves_no_lock(tmp_path, monkeypatch):
    from wsi_her2 import locks

    monkeypatch.setattr(locks.os, "link", lambda *a: (_ for _ in ()).throw(OSError(errno.EPERM, "no hard links")))
    real_fdopen = os.fdopen

    def full_fdopen(fd, *args, **kwargs):
        fh = real_fdopen(fd, *args, **kwargs)
        fh.write = lambda data: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device"))
        return fh

    monkeypatch.setattr(locks.os, "fdopen", full_fdopen)
    with pytest.raises(OSError, match="No space left"):
        locks.acquire_lock(tmp_path / "x.lock")
    assert list(tmp_path.iterdir()) == []


def test_lock_temporary_file_of_a_killed_process_is_cleaned(tmp_path):
    """A process killed between writing the lock's temporary file and linking it leaves the file;
    the next run's cleanup removes it (its owner is gone)."""
    script = textwrap.dedent(f"""
        import os
        from pathlib import Path
        from wsi_her2 import locks
        locks.os.link = lambda *a: os._exit(9)  # killed at this instant
        locks.acquire_lock(Path({str(tmp_path / 'slides.csv.lock')!r}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 9, proc.stderr
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".slides.csv.lock.") and left[0].endswith(".tmp")
    assert clean_stale_tmp(tmp_path) == 1 and list(tmp_path.iterdir()) == []
