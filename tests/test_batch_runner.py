"""Cohort runner on a local dask cluster: fault isolation, retries, resume after a kill, two runners, stale locks.

The scorer is mostly a stand-in (`_fake_score`, quick and deterministic, writing one marker file
per call) so that the tests exercise the orchestration, not the model; one test runs the real
``score_store`` through the CLI. Tiling is always the real ``tile_slide`` (wrapped to count calls).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from wsi_her2.batch.manifest import load_jobs
from wsi_her2.vocab import HER2_CLASSES as HER2_LABELS
from wsi_her2.batch.runner import PER_SLIDE_DIRNAME, RunConfig, run_cohort
from wsi_her2.batch.state import StateStore

distributed = pytest.importorskip("distributed")
REPO = Path(__file__).resolve().parents[1]
GOOD = ("g1", "g2", "g3")


# --- stand-in stages (module level: pickled to the workers) --------------------------------------------
def _marker(out_dir: Path, sid: str, stage: str) -> None:
    calls = Path(out_dir).parent / "calls"
    calls.mkdir(exist_ok=True)
    (calls / f"{sid}.{stage}.{os.getpid()}.{uuid.uuid4().hex[:6]}").touch()


def _counting_tile(slide, out_dir, *, config):
    """The real tile_slide, plus a marker per call, and two test behaviours chosen by file name."""
    from wsi_her2.tile.pipeline import slide_id_for, tile_slide

    sid = slide_id_for(Path(slide))
    _marker(out_dir, sid, "tile")
    if sid.startswith("zcrash"):
        os._exit(13)  # the worker process dies, as on a segfault in a reader
    if sid.startswith("flaky") and len(list((Path(out_dir).parent / "calls").glob(f"{sid}.tile.*"))) == 1:
        raise ConnectionResetError(f"{slide}: network share hiccup (first attempt only)")
    return tile_slide(slide, out_dir, config=config)


def _fake_score(store_path: Path, out_dir: Path, score_config) -> dict:
    """Deterministic stand-in for score_store: a row computed from the stored tiles."""
    from wsi_her2.store.patch_store import open_store

    store = open_store(store_path)
    _marker(out_dir, store.slide_id, "score")
    delay = float(os.environ.get("WSI_HER2_TEST_SCORE_DELAY_S", "0"))
    if delay:
        time.sleep(delay)
    tiles = store.read_tiles(0, min(store.n_tiles, 16)).astype(np.float64)
    brown = float((tiles[..., 0] - tiles[..., 2]).mean())  # DAB is redder than blue: a crude grade proxy
    grade = int(np.clip(brown / 12.0, 0, 3))
    return {"slide": store.slide_id, "her2_score": HER2_LABELS[grade], "confidence": round(brown / 100.0, 4),
            "frac_0": 0.0, "frac_1+": 0.0, "frac_2+": 0.0, "frac_3+": 0.0, "tiles_used": int(store.qc_pass.sum()),
            "tiles_rejected": int((~store.qc_pass).sum()), "model": "fake", "aggregation": "none"}


def _calls(out: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for p in (out / "calls").glob("*"):
        key = ".".join(p.name.split(".")[:2])
        counts[key] = counts.get(key, 0) + 1
    return counts


# --- fixtures --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> Path:
    """g1/g2/g3 (IHC 1+/2+/3+, 2016 px, 9 tiles each), nompp (no pixel size), corrupt (truncated)."""
    from wsi_her2.synthetic.slides import graded_ihc_spec, write_synthetic_slide

    d = tmp_path_factory.mktemp("slides")
    for g in (1, 2, 3):
        write_synthetic_slide(d / f"g{g}.svs", graded_ihc_spec(block_px=672, grades=(g,), pyramid_downsamples=(1, 4)))
    write_synthetic_slide(d / "nompp.svs", graded_ihc_spec(block_px=672, grades=(3,), write_mpp=False,
                                                           pyramid_downsamples=(1, 4)))
    data = (d / "g1.svs").read_bytes()
    (d / "corrupt.svs").write_bytes(data[: len(data) // 3])
    (d / "notes.txt").write_text("not a slide")
    return d


def _subset(src: Path, dst: Path, names: dict[str, str]) -> Path:
    """A slide folder holding hard links (or copies) of ``src/<a>.svs`` under new names."""
    dst.mkdir()
    for new, old in names.items():
        try:
            os.link(src / f"{old}.svs", dst / f"{new}.svs")
        except OSError:
            (dst / f"{new}.svs").write_bytes((src / f"{old}.svs").read_bytes())
    return dst


@pytest.fixture(scope="module")
def thread_client():
    """A cheap in-process cluster (2 worker threads) shared by the tests that do not need processes."""
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as c:
        with distributed.Client(c) as client:
            yield client


def _config(**kw) -> RunConfig:
    kw.setdefault("poll_s", 0.2)
    return RunConfig(**kw)


# --- tests -------------------------------------------------------------------------------------------------
def test_process_cluster_isolates_corrupt_no_mpp_and_dying_worker(slides, tmp_path):
    """2 worker processes; bad slides fail alone with their reason, a transient failure is retried."""
    import cloudpickle
    import dask

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    src = _subset(slides, tmp_path / "in", {
        "g1": "g1", "g2": "g2", "g3": "g3", "nompp": "nompp", "corrupt": "corrupt", "zcrash": "g1", "flaky": "g2"})
    out = tmp_path / "out"
    jobs = load_jobs(src)
    assert [j.slide_id for j in jobs] == ["corrupt", "flaky", "g1", "g2", "g3", "nompp", "zcrash"]
    # dask gives up on a task at its first worker death (default 3: 4 restarts per attempt)
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as c:
            with distributed.Client(c) as client:
                res = run_cohort(jobs, out, client, config=_config(retries=1), tile_fn=_counting_tile, score_fn=_fake_score)

    assert res.done == ["flaky", "g1", "g2", "g3"], res.failed
    assert set(res.failed) == {"corrupt", "nompp", "zcrash"}
    assert res.exit_code == 1
    store = StateStore(out)
    assert store.read("nompp").error_type == "MppMissingError" and "mpp" in store.read("nompp").reason.lower()
    assert not store.read("nompp").retryable
    corrupt = store.read("corrupt")
    assert corrupt.stage == "tile" and not corrupt.retryable and corrupt.error_type == "SlideOpenError", corrupt
    assert store.read("zcrash").error_type == "KilledWorker" and store.read("zcrash").retryable
    flaky = store.read("flaky")
    assert flaky.status == "done" and flaky.attempts >= 2  # (+1 if it was queued where zcrash crashed)
    calls = _calls(out)
    # Counts are lower bounds, and attempts may be one more than the runner's retries: a task only
    # queued on the worker zcrash kills is resubmitted (which tasks were queued there is timing).
    # That a permanent failure is never retried shows in its state: failed, not retryable.
    assert calls["flaky.tile"] >= 2 and calls["corrupt.tile"] >= 1 and calls["nompp.tile"] >= 1
    assert all(calls[f"{g}.tile"] >= 1 and calls[f"{g}.score"] >= 1 for g in GOOD)
    assert calls["zcrash.tile"] >= 2 and "zcrash.score" not in calls  # first try + retries
    for g in GOOD:
        assert (out / PER_SLIDE_DIRNAME / f"{g}.zarr").is_dir()
    assert not list((out / "state").glob(".*")) and not list((out / "state").glob("*.lock"))

    lines = (out / "slides.csv").read_text().splitlines()
    assert [ln.split(",")[0] for ln in lines[1:]] == [j.slide_id for j in jobs]
    by_slide = {ln.split(",")[0]: ln for ln in lines[1:]}
    assert ",done," in by_slide["g3"] and ",failed," in by_slide["nompp"] and "MppMissingError" in by_slide["nompp"]

    from wsi_her2.cli import main
    from wsi_her2.cli.status import collect

    status = {r["slide"]: r for r in collect(out)}
    assert status["zcrash"]["status"] == "failed" and "KilledWorker" in status["zcrash"]["reason"]
    assert status["g1"]["status"] == "done"
    assert main(["status", str(out)]) == 1


def _runner_script(tmp_path: Path, src: Path, out: Path, *, lock_timeout_s: float = 30.0) -> Path:
    script = tmp_path / f"runner_{uuid.uuid4().hex[:6]}.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{str(REPO)!r}, {str(Path(__file__).parent)!r}]
        import distributed
        from test_batch_runner import _counting_tile, _fake_score
        from wsi_her2.batch.manifest import load_jobs
        from wsi_her2.batch.runner import RunConfig, run_cohort
        if __name__ == "__main__":
            with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as c:
                with distributed.Client(c) as client:
                    res = run_cohort(load_jobs({str(src)!r}), {str(out)!r}, client, tile_fn=_counting_tile,
                                     score_fn=_fake_score, config=RunConfig(poll_s=0.2, lock_timeout_s={lock_timeout_s}))
            sys.exit(res.exit_code)
    """))
    return script


def test_killed_run_resumes_to_identical_slides_csv(slides, tmp_path, thread_client):
    src = _subset(slides, tmp_path / "in", {"g1": "g1", "g2": "g2", "g3": "g3", "nompp": "nompp", "corrupt": "corrupt"})
    ref = tmp_path / "ref"
    res_ref = run_cohort(load_jobs(src), ref, thread_client, config=_config(), tile_fn=_counting_tile, score_fn=_fake_score)
    assert res_ref.done == list(GOOD)

    out = tmp_path / "killed"
    env = dict(os.environ, WSI_HER2_TEST_SCORE_DELAY_S="1.5")
    proc = subprocess.Popen([sys.executable, str(_runner_script(tmp_path, src, out))], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 90
    store = None
    while time.time() < deadline and proc.poll() is None:
        if (out / "state").is_dir():
            store = store or StateStore(out)
            if any((s.status == "done") for s in store.read_all().values()):
                break
        time.sleep(0.1)
    assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {sid: s.status for sid, s in StateStore(out).read_all().items()}
    done_before = sorted(sid for sid, st in before.items() if st == "done")
    assert done_before and len(done_before) < 3 + 2, before  # killed midway: something left to do
    assert any(p.suffix == ".lock" for p in (out / "state").iterdir())  # the dead runner's locks remain

    res = run_cohort(load_jobs(src), out, thread_client, config=_config(), tile_fn=_counting_tile, score_fn=_fake_score)
    assert res.done == list(GOOD) and set(res.failed) == {"corrupt", "nompp"}
    assert (out / "slides.csv").read_bytes() == (ref / "slides.csv").read_bytes()
    calls = _calls(out)
    for sid in done_before:  # finished before the kill: neither tiled nor scored again
        assert calls.get(f"{sid}.tile") == 1 and calls.get(f"{sid}.score") == 1, (sid, calls)
    # a third run has nothing left to do and rewrites the same table
    n_calls = sum(calls.values())
    res3 = run_cohort(load_jobs(src), out, thread_client, config=_config(), tile_fn=_counting_tile, score_fn=_fake_score)
    assert res3.processed_here == 0 and sum(_calls(out).values()) == n_calls
    assert (out / "slides.csv").read_bytes() == (ref / "slides.csv").read_bytes()


def test_two_concurrent_runners_never_duplicate_work(slides, tmp_path):
    names = {f"s{i}": f"g{1 + i % 3}" for i in range(6)}
    src = _subset(slides, tmp_path / "in", names)
    out = tmp_path / "out"
    env = dict(os.environ, WSI_HER2_TEST_SCORE_DELAY_S="0.5")
    procs = [subprocess.Popen([sys.executable, str(_runner_script(tmp_path, src, out))], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(2)]
    outputs = [p.communicate(timeout=150)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    calls = _calls(out)
    for sid in names:
        assert calls.get(f"{sid}.tile") == 1 and calls.get(f"{sid}.score") == 1, (sid, calls)
    states = StateStore(out).read_all()
    assert all(states[sid].status == "done" for sid in names)
    rows = (out / "slides.csv").read_text().splitlines()[1:]
    assert [r.split(",")[0] for r in rows] == sorted(names)
    assert not list((out / "state").glob("*.lock"))  # both released everything


def test_expired_lock_taken_over_live_lock_respected(slides, tmp_path, thread_client):
    src = _subset(slides, tmp_path / "in", {"a": "g1", "b": "g2", "c": "g3"})
    out = tmp_path / "out"
    store = StateStore(out)
    now = time.time()
    # a: a runner on another host stopped beating 10 min ago (timeout 60 s): expired
    store.lock_path("a").write_text(json.dumps({"hostname": "other-host", "pid": 4242, "token": "x",
                                                "heartbeat": now - 600, "acquired": now - 700, "timeout_s": 60}))
    # b: a runner on another host that is alive (fresh heartbeat): must be left alone
    store.lock_path("b").write_text(json.dumps({"hostname": "other-host", "pid": 4243, "token": "y",
                                               "heartbeat": now + 3600, "acquired": now, "timeout_s": 60}))
    res = run_cohort(load_jobs(src), out, thread_client, config=_config(wait_for_others=False),
                     tile_fn=_counting_tile, score_fn=_fake_score)
    assert res.done == ["a", "c"] and res.pending == ["b"] and res.exit_code == 3
    calls = _calls(out)
    assert "b.tile" not in calls and calls["a.tile"] == 1
    assert json.loads(store.lock_path("b").read_text())["token"] == "y"

    from wsi_her2.cli.status import collect

    status = {r["slide"]: r for r in collect(out)}
    assert status["b"]["status"] == "running" and status["b"]["owner"] == "other-host:4243"


def test_stop_hook_then_resume(slides, tmp_path, thread_client):
    src = _subset(slides, tmp_path / "in", {"a": "g1", "b": "g2", "c": "g3"})
    out = tmp_path / "out"
    res = run_cohort(load_jobs(src), out, thread_client, config=_config(max_in_flight=1),
                     tile_fn=_counting_tile, score_fn=_fake_score, stop_after=1)
    assert len(res.done) == 1 and res.exit_code == 3
    first = res.done[0]
    res2 = run_cohort(load_jobs(src), out, thread_client, config=_config(), tile_fn=_counting_tile, score_fn=_fake_score)
    assert res2.done == ["a", "b", "c"] and res2.processed_here == 2
    assert _calls(out)[f"{first}.score"] == 1


def test_cli_run_with_manifest_and_real_scorer(slides, tmp_path):
    """`wsi-her2 run manifest.csv` end to end with the real scorer (threads): MPP from the manifest, labels, report."""
    pytest.importorskip("wsi_her2.score.pipeline")
    from wsi_her2.cli import main

    manifest = tmp_path / "manifest.csv"
    manifest.write_text(
        "slide,mpp,label,patient\n"
        f"{slides / 'g1.svs'},,1+,P1\n"
        f"{slides / 'nompp.svs'},0.5,3+,P2\n"
        f"{slides / 'corrupt.svs'},,2+,P3\n"
    )
    out = tmp_path / "out"
    rc = main(["run", str(manifest), "-o", str(out), "--threads", "--workers", "2", "--gpus", "none", "-q",
               "--min-tiles", "4", "--device", "cpu", "--batch-size", "16"])
    assert rc == 1  # the corrupt slide
    states = StateStore(out).read_all()
    assert states["g1"].status == "done" and states["nompp"].status == "done" and states["corrupt"].status == "failed"
    for sid in ("g1", "nompp"):
        for suffix in (".json", ".geojson", ".tiles.parquet", ".heatmap.png"):
            assert (out / PER_SLIDE_DIRNAME / f"{sid}{suffix}").is_file(), (sid, suffix)
    report = json.loads((out / "agreement.json").read_text())
    assert report["n_labelled"] == 3 and report["n_compared"] == 2 and report["not_scored"] == ["corrupt"]
    assert np.asarray(report["confusion_matrix"]).sum() == 2
    rows = (out / "slides.csv").read_text().splitlines()
    assert rows[0].startswith("slide,status,her2_score") and "P2" in rows[3]
    assert main(["status", str(out), "--json"]) == 1


def test_slurm_cluster_job_script():
    pytest.importorskip("dask_jobqueue")
    from wsi_her2.batch.cluster import make_slurm_cluster

    cluster = make_slurm_cluster(queue="gpu", cores=6, memory="24GB", walltime="01:00:00", gpus_per_job=1,
                                 job_extra=["--constraint=a100"], prologue=["module load cuda"])
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    assert "#SBATCH -p gpu" in script and "--gres=gpu:1" in script and "--constraint=a100" in script
    assert "--resources CPU=5,GPU=1" in script and "module load cuda" in script


def _placed_tile(slide, out_dir, *, config):
    from distributed import get_worker

    (Path(out_dir).parent / "placed").mkdir(exist_ok=True)
    (Path(out_dir).parent / "placed" / f"tile.{Path(slide).stem}.{get_worker().name}").touch()
    return _counting_tile(slide, out_dir, config=config)


def _placed_score(store_path, out_dir, score_config):
    from distributed import get_worker

    (Path(out_dir).parent / "placed" / f"score.{Path(store_path).stem}.{get_worker().name}").touch()
    return _fake_score(store_path, out_dir, score_config)


def test_resources_route_scoring_to_the_gpu_worker(slides, tmp_path):
    """A local cluster told it has one GPU: scoring only on the GPU worker, tiling only on CPU workers."""
    from wsi_her2.batch.cluster import local_cluster

    src = _subset(slides, tmp_path / "in", {f"s{i}": f"g{1 + i % 3}" for i in range(4)})
    out = tmp_path / "out"
    with local_cluster(n_workers=2, gpus=["0"], processes=False, dashboard_address=None) as handle:
        assert "GPU=1" in handle.description
        res = run_cohort(load_jobs(src), out, handle.client, config=_config(), tile_fn=_placed_tile, score_fn=_placed_score)
    assert res.done == ["s0", "s1", "s2", "s3"]
    placed = [p.name.split(".") for p in (out / "placed").iterdir()]
    assert {w for stage, _, w in placed if stage == "score"} == {"gpu-0"}
    assert {w for stage, _, w in placed if stage == "tile"} <= {"tile-0", "tile-1"}
    assert len([1 for stage, _, _ in placed if stage == "tile"]) == 4
