"""Cohort throughput: ``wsi-her2 run`` on a dask cluster vs the single-slide commands one after another.

Writes a cohort of synthetic IHC slides, then times

1. ``sequential``: for each slide, ``python -m wsi_her2 tile SLIDE --workers 1`` then
   ``python -m wsi_her2 score STORE`` (what a shell loop over the single-slide commands does,
   start-up included);
2. ``cohort, N workers``: :func:`wsi_her2.batch.runner.run_cohort` on a local cluster of N
   single-threaded worker processes (cluster start-up included), for each N in ``--workers``.

Prints a table: seconds, slides per hour, tiles per second and speed-up over sequential.

    PYTHONPATH=. python benchmarks/bench_cohort.py --slides 6 --block-px 896 --workers 1 2
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_cohort(folder: Path, *, n_slides: int, block_px: int) -> list[Path]:
    from wsi_her2.synthetic.slides import graded_ihc_spec, write_synthetic_slide

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n_slides):
        # each slide: four graded blocks in a rotated order, so slides differ but cost the same
        grades = tuple((i + k) % 4 for k in range(4))
        path = folder / f"bench-{i:03d}.svs"
        if not path.exists():
            write_synthetic_slide(path, graded_ihc_spec(block_px=block_px, grades=grades, seed=0))
        paths.append(path)
    return paths


def run_sequential(slides: list[Path], out: Path, *, score_args: list[str]) -> tuple[float, int]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    t0 = time.perf_counter()
    for slide in slides:
        subprocess.run([sys.executable, "-m", "wsi_her2", "tile", str(slide), "-o", str(out), "--workers", "1", "-q"],
                       check=True, env=env, stdout=subprocess.DEVNULL)
        subprocess.run([sys.executable, "-m", "wsi_her2", "score", str(out / f"{slide.stem}.zarr"), "-q", *score_args],
                       check=True, env=env, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - t0
    tiles = 0
    for slide in slides:
        tiles += json.loads((out / f"{slide.stem}.json").read_text())["row"]["tiles_used"]
        tiles += json.loads((out / f"{slide.stem}.json").read_text())["row"]["tiles_rejected"]
    return seconds, tiles


def run_cluster(slide_dir: Path, out: Path, *, n_workers: int, score_config) -> tuple[float, int, int]:
    from wsi_her2.batch.cluster import local_cluster
    from wsi_her2.batch.manifest import load_jobs
    from wsi_her2.batch.runner import RunConfig, run_cohort

    logging.getLogger("distributed").setLevel(logging.ERROR)  # worker start/stop chatter
    t0 = time.perf_counter()
    with local_cluster(n_workers=n_workers, gpus=[], processes=True, dashboard_address=None) as handle:
        res = run_cohort(load_jobs(slide_dir), out, handle.client, config=RunConfig(score=score_config))
    return time.perf_counter() - t0, res.tiles_here, len(res.failed)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slides", type=int, default=6)
    p.add_argument("--block-px", type=int, default=896, help="graded block size (slide = 5 x 5 blocks; 896 -> 4480 px)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--device", default="cpu")
    p.add_argument("--keep", default=None, help="folder to keep slides and outputs in (default: a temporary one)")
    p.add_argument("--no-sequential", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from wsi_her2.score.pipeline import ScoreConfig

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="wsi-her2-bench-"))
    t0 = time.perf_counter()
    slides = make_cohort(root / "slides", n_slides=args.slides, block_px=args.block_px)
    print(f"{len(slides)} synthetic slides of {5 * args.block_px} px square in {root / 'slides'} "
          f"(written in {time.perf_counter() - t0:.0f} s); {os.cpu_count()} CPUs, scoring on {args.device}")
    results = []
    if not args.no_sequential:
        shutil.rmtree(root / "seq", ignore_errors=True)
        secs, tiles = run_sequential(slides, root / "seq", score_args=["--device", args.device])
        results.append(("sequential single-slide commands", secs, tiles, 0))
    for n in args.workers:
        out = root / f"cohort-{n}"
        shutil.rmtree(out, ignore_errors=True)
        secs, tiles, failed = run_cluster(root / "slides", out, n_workers=n, score_config=ScoreConfig(device=args.device))
        results.append((f"wsi-her2 run, {n} worker process{'es' if n > 1 else ''}", secs, tiles, failed))

    base = results[0][1]
    print(f"\n{'mode':38} {'seconds':>8} {'slides/h':>9} {'tiles/s':>8} {'speed-up':>9} {'failed':>7}")
    for name, secs, tiles, failed in results:
        print(f"{name:38} {secs:8.1f} {3600 * len(slides) / secs:9.0f} {tiles / secs:8.1f} {base / secs:8.2f}x {failed:7d}")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
