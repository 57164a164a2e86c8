"""Per-slide state files, expiring locks, and cohort sources (folder / manifest)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from wsi_her2.batch.manifest import SlideJob, load_jobs, read_manifest
from wsi_her2.vocab import parse_her2_label as normalise_label
from wsi_her2.batch.state import (
    LockKeeper, LockOwner, SlideState, StateStore, acquire_lock, input_key, lock_staleness, read_lock,
)
from wsi_her2.errors import ConfigError, SlideNotFoundError


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid  # reaped: no process has this pid now (reuse within the test is vanishingly rare)


def _write_lock(path: Path, **info) -> dict:
    base = {"hostname": "elsewhere", "pid": 1, "token": "t-old", "acquired": time.time(), "heartbeat": time.time(), "timeout_s": 60}
    base.update(info)
    path.write_text(json.dumps(base))
    return base


# --- state files -------------------------------------------------------------------------------------
def test_state_roundtrip_and_torn_file(tmp_path):
    store = StateStore(tmp_path)
    assert store.read("s1") is None
    store.write(SlideState("s1", status="done", attempts=2, row={"slide": "s1", "her2_score": "2+"}))
    got = store.read("s1")
    assert got.status == "done" and got.attempts == 2 and got.row["her2_score"] == "2+"
    assert got.pid == os.getpid() and got.updated > 0
    store.state_path("s2").write_text('{"slide_id": "s2", "stat')  # torn
    assert store.read("s2") is None
    assert set(store.read_all()) == {"s1"}
    assert not [p for p in store.dir.iterdir() if p.name.endswith(".tmp")]


def test_input_key_tracks_file_and_settings(tmp_path):
    f = tmp_path / "a.svs"
    f.write_bytes(b"x" * 10)
    k = input_key(f, mpp_um=None)
    assert k == input_key(f, mpp_um=None)
    assert k != input_key(f, mpp_um=0.25)
    f.write_bytes(b"y" * 11)
    assert k != input_key(f, mpp_um=None)
    assert input_key(tmp_path / "missing.svs", mpp_um=None) != k


# --- locks -------------------------------------------------------------------------------------------
def test_lock_is_exclusive_and_released(tmp_path):
    path = tmp_path / "s.lock"
    a = acquire_lock(path, timeout_s=60)
    assert a is not None and a.held()
    assert acquire_lock(path, timeout_s=60) is None  # another owner, this (live) process
    info = read_lock(path)
    assert info["pid"] == os.getpid() and info["hostname"] == socket.gethostname()
    a.release()
    assert not path.exists()
    assert acquire_lock(path, timeout_s=60) is not None


def test_same_owner_reacquires(tmp_path):
    owner = LockOwner()
    path = tmp_path / "s.lock"
    assert acquire_lock(path, owner=owner) is not None
    assert acquire_lock(path, owner=owner) is not None


def test_lock_of_dead_process_on_this_host_is_stale_at_once(tmp_path):
    path = tmp_path / "s.lock"
    _write_lock(path, hostname=socket.gethostname(), pid=_dead_pid())
    assert "gone" in lock_staleness(path, read_lock(path), timeout_s=60)
    lock = acquire_lock(path, timeout_s=60)
    assert lock is not None and read_lock(path)["token"] == lock.owner.token


def test_other_host_lock_expires_only_after_timeout(tmp_path):
    path = tmp_path / "s.lock"
    _write_lock(path, heartbeat=time.time() - 30, timeout_s=60)
    assert lock_staleness(path, read_lock(path), timeout_s=60) is None
    assert acquire_lock(path, timeout_s=60) is None
    _write_lock(path, heartbeat=time.time() - 61, timeout_s=60)
    assert "heartbeat" in lock_staleness(path, read_lock(path), timeout_s=60)
    assert acquire_lock(path, timeout_s=60) is not None


def test_unparseable_lock_judged_by_file_age(tmp_path):
    path = tmp_path / "s.lock"
    path.write_text("garbage")
    assert acquire_lock(path, timeout_s=60) is None
    old = time.time() - 120
    os.utime(path, (old, old))
    assert acquire_lock(path, timeout_s=60) is not None


def test_heartbeat_keeps_lock_alive_and_detects_takeover(tmp_path):
    path = tmp_path / "s.lock"
    lock = acquire_lock(path, timeout_s=0.6)
    with LockKeeper(interval_s=0.1) as keeper:
        keeper.add("s", lock)
        time.sleep(1.0)  # longer than the timeout: only the heartbeat keeps it fresh
        assert lock_staleness(path, read_lock(path), timeout_s=0.6) is None
        assert acquire_lock(path, timeout_s=0.6) is None
        keeper.release("s")
    assert not path.exists()
    lock = acquire_lock(path, timeout_s=60)
    _write_lock(path, token="intruder")
    assert lock.heartbeat() is False and lock.lost
    lock.release()  # not ours any more: must not delete the intruder's lock
    assert read_lock(path)["token"] == "intruder"


def test_concurrent_acquire_has_one_winner(tmp_path):
    path = tmp_path / "s.lock"
    _write_lock(path, heartbeat=time.time() - 1000)  # stale: everyone races to take it over
    barrier = threading.Barrier(16)
    winners = []

    def contender():
        barrier.wait()
        lock = acquire_lock(path, timeout_s=60)
        if lock is not None:
            winners.append(lock.owner.token)

    threads = [threading.Thread(target=contender) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(winners) == 1
    assert read_lock(path)["token"] == winners[0]


def test_takeover_does_not_steal_a_lock_refreshed_meanwhile(tmp_path):
    """A runner that judged a lock stale must not remove it if it was replaced before the removal."""
    from wsi_her2.locks import _remove_stale

    path = tmp_path / "s.lock"
    judged = _write_lock(path, heartbeat=time.time() - 1000)
    fresh = _write_lock(path, token="t-new")  # another runner took it over in between
    assert _remove_stale(path, judged) is False
    assert read_lock(path) == fresh
    mutex = path.with_name("s.lock.takeover")
    mutex.write_text("{}")  # another taker is at work: stand back
    assert _remove_stale(path, fresh) is False and path.exists()
    old = time.time() - 60
    os.utime(mutex, (old, old))  # ... unless it died there: its mutex expires
    assert _remove_stale(path, fresh) is False and not mutex.exists()
    assert _remove_stale(path, fresh) is True and not path.exists()


# --- cohort sources ------------------------------------------------------------------------------------
def test_directory_source_sorted_and_filtered(tmp_path):
    for name in ("b.svs", "a.tiff", "c.ome.tif", "notes.txt", ".hidden.svs"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.ndpi").write_bytes(b"x")
    assert [j.slide_id for j in load_jobs(tmp_path)] == ["a", "b", "c"]
    assert [j.slide_id for j in load_jobs(tmp_path, recursive=True)] == ["a", "b", "c", "d"]
    with pytest.raises(SlideNotFoundError):
        load_jobs(tmp_path / "sub" / "nothing")


def test_manifest_columns_relative_paths_and_labels(tmp_path):
    (tmp_path / "slides").mkdir()
    m = tmp_path / "cohort.csv"
    m.write_text("Slide,MPP,HER2,patient_id\nslides/z.svs,0.25,3,P1\n/abs/a.svs,,1+,\nslides/m.svs,, ,P3\n\n")
    jobs = read_manifest(m)
    assert [j.slide_id for j in jobs] == ["a", "m", "z"]
    z = jobs[2]
    assert z == SlideJob("z", tmp_path / "slides" / "z.svs", mpp_um=0.25, label="3+", patient_id="P1")
    assert jobs[0].path == Path("/abs/a.svs") and jobs[0].mpp_um is None and jobs[0].label == "1+"
    assert jobs[1].label is None and jobs[1].patient_id == "P3"
    assert SlideJob.from_dict(z.to_dict()) == z


@pytest.mark.parametrize("text, why", [
    ("path\na.svs\nb/a.svs\n", "share the id"),
    ("slide,mpp\na.svs,fast\n", "not a number"),
    ("slide,mpp\na.svs,-1\n", "positive"),
    ("slide,label\na.svs,4+\n", "HER2 score"),
    ("file_name\na.svs\n", "'slide' column"),
    ("slide\n\n", "no slides"),
])
def test_manifest_errors_say_what_is_wrong(tmp_path, text, why):
    m = tmp_path / "m.csv"
    m.write_text(text)
    with pytest.raises(ConfigError, match=why):
        read_manifest(m)


@pytest.mark.parametrize("raw, label", [("0", "0"), (0, "0"), ("1+", "1+"), (" 2 + ", "2+"), ("3.0", "3+"),
                                        ("HER2 2+", "2+"), ("", None), ("NA", None), (None, None)])
def test_normalise_label(raw, label):
    assert normalise_label(raw) == label


def test_normalise_label_rejects_non_scores():
    for bad in ("4", "2++", "positive", "-1"):
        with pytest.raises(ConfigError):
            normalise_label(bad)
