"""`score` and `run` killed (SIGKILL) at many instants, then run to the end, give exactly the outputs
of an uninterrupted run; no killed instant ever leaves a `<id>.json` over outputs other than those
it records. Seeded instants; the default suite kills a few times, `-m slow` many more."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from wsi_her2.outputs.manifest import OUTPUT_FILES_KEY, check_result

SEED = 19
pytestmark = pytest.mark.skipif(os.name != "posix", reason="SIGKILL")


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> Path:
    from wsi_her2.synthetic.slides import graded_ihc_spec, write_synthetic_slide

    folder = tmp_path_factory.mktemp("kill-slides")
    for g in (1, 3):
        write_synthetic_slide(folder / f"g{g}.svs", graded_ihc_spec(block_px=448, grades=(g, 2), dust=False,
                                                                    pyramid_downsamples=(1, 4)))
    return folder


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "wsi_her2", *args]


def _run(args: list[str], cwd: Path) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return time.perf_counter() - t0


def _kill_at(args: list[str], cwd: Path, after_s: float) -> bool:
    """Start ``args``, SIGKILL it ``after_s`` seconds later; whether it was still running then."""
    proc = subprocess.Popen(args, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        proc.wait(timeout=after_s)
        return False
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return True


def _instants(n: int, span_s: float) -> list[float]:
    """Half anywhere in the run, half in its last 40 % (where the outputs are written)."""
    rng = np.random.default_rng(SEED)
    return [span_s * (rng.uniform(0.02, 1.0) if k % 2 else rng.uniform(0.6, 1.0)) for k in range(n)]


def _results(folder: Path) -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted(folder.glob("*.json")) if p.name != "run.json"}


def _assert_no_json_over_damaged_outputs(folder: Path) -> None:
    for path in folder.glob("*.json"):
        try:
            record = json.loads(path.read_text())
        except ValueError:
            pytest.fail(f"{path.name} is torn")
        if "call" in record:
            assert check_result(path, record, tables=("regions.csv", "cores.csv")) == [], path


def _assert_same_outputs(folder: Path, ref: Path) -> None:
    from wsi_her2.cli import main

    assert main(["verify", str(folder)]) == 0
    got, want = _results(folder), _results(ref)
    assert set(got) == set(want)
    for name in want:
        assert got[name]["call"] == want[name]["call"] and got[name]["row"] == want[name]["row"], name
        assert got[name][OUTPUT_FILES_KEY] == want[name][OUTPUT_FILES_KEY], name  # every file, byte for byte
    assert (folder / "slides.csv").read_bytes() == (ref / "slides.csv").read_bytes()
    left = [p.name for p in folder.rglob(".*.tmp")] + [p.name for p in folder.glob("*.lock")]
    assert left == []


def _kill_score_many_times(slides: Path, tmp_path: Path, n_kills: int) -> None:
    _run(_command("tile", str(slides / "g1.svs"), "-o", "tiled", "-q"), tmp_path)
    store = str(tmp_path / "tiled" / "g1.zarr")
    span = _run(_command("score", store, "-o", "ref", "-q", "--min-tiles", "1"), tmp_path)
    hits = 0
    for k, at in enumerate(_instants(n_kills, span)):
        extra = ["--overwrite"] if k % 3 == 2 else []  # killed while rewriting complete outputs, too
        hits += _kill_at(_command("score", store, "-o", "out", "-q", "--min-tiles", "1", *extra), tmp_path, at)
        _assert_no_json_over_damaged_outputs(tmp_path / "out")
    assert hits >= n_kills // 2, f"only {hits} of {n_kills} runs were still running when killed"
    _run(_command("score", store, "-o", "out", "-q", "--min-tiles", "1"), tmp_path)
    _assert_same_outputs(tmp_path / "out", tmp_path / "ref")


def _kill_run_many_times(slides: Path, tmp_path: Path, n_kills: int) -> None:
    """Kills accumulate in one output folder until a run finishes before its instant; that folder is
    then compared with the reference and the next kills start a fresh one."""
    pytest.importorskip("distributed")
    options = ["--threads", "--workers", "1", "--gpus", "none", "--device", "cpu", "-q", "--min-tiles", "1"]
    span = _run(_command("run", str(slides), "-o", "ref", *options), tmp_path)
    hits, folder = 0, 0
    for at in _instants(n_kills, span):
        out = tmp_path / f"out{folder}"
        if _kill_at(_command("run", str(slides), "-o", out.name, *options), tmp_path, at):
            hits += 1
            _assert_no_json_over_damaged_outputs(out / "per-slide")
        else:
            _assert_same_cohort(out, tmp_path / "ref")
            folder += 1
    assert hits >= n_kills // 2, f"only {hits} of {n_kills} runs were still running when killed"
    out = tmp_path / f"out{folder}"
    _run(_command("run", str(slides), "-o", out.name, *options), tmp_path)
    _assert_same_cohort(out, tmp_path / "ref")


def _assert_same_cohort(out: Path, ref: Path) -> None:
    assert (out / "slides.csv").read_bytes() == (ref / "slides.csv").read_bytes()
    _assert_same_outputs(out / "per-slide", ref / "per-slide")
    assert not list((out / "state").glob("*.lock"))


def test_score_killed_at_many_instants_recovers_identically(slides, tmp_path):
    _kill_score_many_times(slides, tmp_path, n_kills=8)


def test_run_killed_at_many_instants_recovers_identically(slides, tmp_path):
    _kill_run_many_times(slides, tmp_path, n_kills=4)


@pytest.mark.slow
def test_score_and_run_killed_at_many_more_instants(slides, tmp_path):
    for name in ("score", "run"):
        (tmp_path / name).mkdir()
    _kill_score_many_times(slides, tmp_path / "score", n_kills=40)
    _kill_run_many_times(slides, tmp_path / "run", n_kills=16)
