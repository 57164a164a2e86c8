"""ihc_dab on CPU in worker processes (wsi_her2.score.cpu_pool) gives the in-process numbers."""
from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest

from wsi_her2.errors import StoreError
from wsi_her2.models.ihc_score import MEASUREMENT_NAMES, IhcDabScorer
from wsi_her2.score import cpu_pool
from wsi_her2.score.inference import InferenceConfig, predict_store
from wsi_her2.store.patch_store import open_store
from wsi_her2.tile.pipeline import TileConfig, tile_slide


@pytest.fixture(scope="module")
def graded_store(graded_slide, tmp_path_factory):
    out = tmp_path_factory.mktemp("pool")
    return tile_slide(graded_slide, out, config=TileConfig(workers=1)).store


def _scorer(store) -> IhcDabScorer:
    from wsi_her2.score.scorer import DEFAULT_MODEL, load_scoring_model

    return load_scoring_model(DEFAULT_MODEL, store_mpp_um=float(store.attrs["tiling"]["effective_mpp_um"]))


@pytest.mark.parametrize("workers", [0, 2, 3])
def test_chunks_in_workers_or_in_process_give_the_batch_loop_numbers(graded_store, workers):
    store = open_store(graded_store)
    model = _scorer(store)
    one = predict_store(store, model, config=InferenceConfig(device="cpu", cpu_workers=1))
    idx = np.flatnonzero(store.qc_pass)
    parts = cpu_pool.score_chunks(store, model, idx, workers=workers)
    assert np.array_equal(np.concatenate([p[0] for p in parts]), idx)  # every tile once, in store order
    probs = np.concatenate([p[1].numpy() for p in parts])
    assert np.array_equal(probs.argmax(1), one.probs[idx].argmax(1))
    assert np.abs(probs - one.probs[idx]).max() < 1e-6
    for name in MEASUREMENT_NAMES:
        got = np.concatenate([p[2][name].numpy() for p in parts])
        # steps 4-6 run on 64-tile chunks here and 64-tile batches there: float summation order only
        assert np.allclose(got, one.measurements[name][idx], rtol=1e-6, atol=1e-6), name
    assert len(set(one.measurements["cell_count"][idx])) > 3  # the slide has graded content, not blanks


def test_real_ihc_through_tile_gives_the_batch_loop_calls_and_measurements(tmp_path):
    """A real HER2 IHC patch made a slide at 0.5 µm/px and tiled: chunk workers = the batch loop."""
    from pathlib import Path

    from PIL import Image

    from wsi_her2.synthetic.image_slide import resample_to_mpp, write_image_slide

    image = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "ihc_dev" / "00014_test_2+.jpg"
    if not image.is_file():
        pytest.skip(f"real fixture {image} not available")
    rgb = resample_to_mpp(np.asarray(Image.open(image).convert("RGB")), 1.0, 0.5)
    slide = write_image_slide(rgb, tmp_path / "real.svs", mpp_um=0.5)
    store = open_store(tile_slide(slide, tmp_path, config=TileConfig(workers=1)).store)
    model = _scorer(store)
    batch = predict_store(store, model, config=InferenceConfig(device="cpu", cpu_workers=1))
    idx = np.flatnonzero(store.qc_pass)
    assert idx.size > 40
    parts = cpu_pool.score_chunks(store, model, idx, workers=2)
    probs = np.concatenate([p[1].numpy() for p in parts])
    assert np.array_equal(probs.argmax(1), batch.probs[idx].argmax(1))
    for name in MEASUREMENT_NAMES:
        got = np.concatenate([p[2][name].numpy() for p in parts])
        assert np.allclose(got, batch.measurements[name][idx], rtol=1e-6, atol=1e-6), name
    assert np.nanmax(batch.measurements["frac_cells_1plus_or_more"]) > 0.3  # stained tumour, not blank tiles


def test_predict_store_takes_the_workers_when_asked(graded_store, monkeypatch, caplog):
    store = open_store(graded_store)
    model = _scorer(store)
    monkeypatch.setattr(cpu_pool, "TILES_PER_PROCESS", 1)
    with caplog.at_level("INFO", logger="wsi_her2.score.inference"):
        pooled = predict_store(store, model, config=InferenceConfig(device="cpu", cpu_workers=2))
    assert "scoring chunk by chunk on 2 CPUs: this process and 1 worker process" in caplog.text
    alone = predict_store(store, model, config=InferenceConfig(device="cpu", cpu_workers=1))
    assert np.array_equal(pooled.scored, alone.scored)
    assert np.allclose(pooled.probs, alone.probs, atol=1e-6, equal_nan=True)


def test_one_cpu_scores_chunk_by_chunk_in_this_process(graded_store, monkeypatch, caplog):
    store = open_store(graded_store)
    monkeypatch.setattr(cpu_pool, "available_cpus", lambda: 1)
    with caplog.at_level("INFO", logger="wsi_her2.score.inference"):
        result = predict_store(store, _scorer(store), config=InferenceConfig(device="cpu", cpu_workers=None))
    assert "scoring chunk by chunk in this process" in caplog.text
    assert result.scored.sum() == store.qc_pass.sum()


@pytest.mark.parametrize("workers", [0, 2])
def test_a_damaged_chunk_is_the_stores_one_line_error(graded_store, tmp_path, workers):
    copy = tmp_path / graded_store.name
    shutil.copytree(graded_store, copy)
    store = open_store(copy)
    chunk = next(p for p in sorted((copy / "tiles").rglob("*")) if p.is_file() and p.name != "zarr.json")
    chunk.write_bytes(chunk.read_bytes()[:-100])
    with pytest.raises(StoreError, match=r"tiles \d+-\d+ unreadable \(ValueError: the chunk fails its CRC32C checksum"):
        cpu_pool.score_chunks(store, _scorer(store), np.flatnonzero(store.qc_pass), workers=workers)


def test_process_count(monkeypatch):
    per = cpu_pool.TILES_PER_PROCESS
    monkeypatch.setattr(cpu_pool, "available_cpus", lambda: 6)
    assert cpu_pool.workers_for(None, 100 * per) == 6  # default: one per CPU this process may use
    assert cpu_pool.workers_for(3, 100 * per) == 3
    assert cpu_pool.workers_for(1, 100 * per) == 0  # one process: no workers
    assert cpu_pool.workers_for(None, 3 * per) == 3  # at most one per TILES_PER_PROCESS tiles
    assert cpu_pool.workers_for(8, 3 * per) == 3
    assert cpu_pool.workers_for(None, 2 * per - 1) == 0  # too few tiles to pay for starting a worker
    monkeypatch.setattr(cpu_pool, "available_cpus", lambda: 64)
    assert cpu_pool.workers_for(None, 1000 * per) == cpu_pool.MAX_DEFAULT_PROCESSES  # ~70 MB each
    assert cpu_pool.workers_for(32, 1000 * per) == 32  # asked for: as asked
    monkeypatch.setattr(cpu_pool, "available_cpus", lambda: 1)
    assert cpu_pool.workers_for(None, 100 * per) == 0


def test_the_worker_side_imports_no_torch():
    """What a spawned worker imports to run its tasks: numpy, OpenCV, imagecodecs, not torch (~2 s)."""
    code = "import sys, wsi_her2.score.cpu_pool; print(sorted(m for m in ('torch', 'timm', 'zarr') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_cohort_runs_score_each_slide_in_one_process(monkeypatch, tmp_path):
    """dask runs slides side by side; a slide's scoring must not start a worker per CPU on top."""
    from wsi_her2.batch import runner
    from wsi_her2.score import pipeline
    from wsi_her2.score.pipeline import ScoreConfig

    seen = {}

    class _Result:
        row = {"slide": "x"}

    def fake_score_store(store_path, out_dir=None, config=None):
        seen["config"] = config
        return _Result()

    monkeypatch.setattr(pipeline, "score_store", fake_score_store)
    runner._score(tmp_path / "x.zarr", tmp_path, ScoreConfig(cpu_workers=None))
    assert seen["config"].cpu_workers == 1


def test_cli_workers_option_reaches_the_score_config():
    from wsi_her2.cli import build_parser
    from wsi_her2.cli.score import score_config_from_args

    args = build_parser().parse_args(["score", "x.zarr", "--workers", "3"])
    assert score_config_from_args(args, progress=False).cpu_workers == 3
    args = build_parser().parse_args(["score", "x.zarr"])
    assert score_config_from_args(args, progress=False).cpu_workers is None  # the command: one per CPU
    with pytest.raises(Exception, match="--workers must be >= 1"):
        InferenceConfig(cpu_workers=0).validate()


def test_zero_workers_is_a_one_line_usage_error(graded_store, tmp_path, capsys):
    from wsi_her2.cli import main

    assert main(["score", str(graded_store), "-o", str(tmp_path), "--workers", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "wsi-her2 score: error: --workers must be >= 1, got 0"
    assert not any(tmp_path.iterdir())  # nothing scored, nothing written


@pytest.mark.parametrize("broken_at", ["result", "submit"])
def test_a_worker_that_dies_is_a_one_line_error_not_a_traceback(graded_store, monkeypatch, broken_at):
    """A killed worker (OOM killer, kill -9) breaks the pool: the slide fails with what to do."""
    from concurrent.futures import Future
    from concurrent.futures.process import BrokenProcessPool

    from wsi_her2.errors import WsiHer2Error

    class DeadPool:
        def __init__(self, *args, **kwargs):
            pass

        def submit(self, fn, *args):
            if broken_at == "submit":
                raise BrokenProcessPool("A child process terminated abruptly, the process pool is not usable anymore")
            future = Future()
            future.set_exception(BrokenProcessPool("A process in the process pool was terminated abruptly"))
            return future

        def shutdown(self, **kwargs):
            pass

    monkeypatch.setattr(cpu_pool, "ProcessPoolExecutor", DeadPool)
    store = open_store(graded_store)
    with pytest.raises(WsiHer2Error, match=r"worker process ended abruptly .* with --workers 1$"):
        cpu_pool.score_chunks(store, _scorer(store), np.flatnonzero(store.qc_pass), workers=2)


def test_one_pool_serves_the_stores_of_a_command_in_turn(graded_store, tmp_path, monkeypatch):
    """Workers start once for many stores; each store keeps its own plan; a damaged store between
    two good ones fails alone and leaves the pool serving the next one."""
    started = []
    real_executor = cpu_pool.ProcessPoolExecutor

    def counting_executor(*args, **kwargs):
        started.append(args[0] if args else kwargs.get("max_workers"))
        return real_executor(*args, **kwargs)

    monkeypatch.setattr(cpu_pool, "ProcessPoolExecutor", counting_executor)
    store = open_store(graded_store)
    model = _scorer(store)
    idx = np.flatnonzero(store.qc_pass)
    alone = np.concatenate([p[1].numpy() for p in cpu_pool.score_chunks(store, model, idx, workers=2)])
    damaged_path = tmp_path / graded_store.name
    shutil.copytree(graded_store, damaged_path)
    chunk = next(p for p in sorted((damaged_path / "tiles").rglob("*")) if p.is_file() and p.name != "zarr.json")
    chunk.write_bytes(chunk.read_bytes()[:-100])
    damaged = open_store(damaged_path)
    started.clear()
    with cpu_pool.ChunkPool() as pool:
        first = cpu_pool.score_chunks(store, model, idx, workers=3, pool=pool)
        with pytest.raises(StoreError, match="unreadable"):
            cpu_pool.score_chunks(damaged, _scorer(damaged), np.flatnonzero(damaged.qc_pass), workers=3, pool=pool)
        second = cpu_pool.score_chunks(store, model, idx, workers=2, pool=pool)  # fewer: the pool is reused
    assert started == [2]  # one pool of 2 workers (3 CPUs: this process and 2) for all three stores
    for parts in (first, second):
        assert np.abs(np.concatenate([p[1].numpy() for p in parts]) - alone).max() < 1e-6
