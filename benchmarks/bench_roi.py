"""Hostile regions files for ``wsi-her2 score --roi``: time and peak memory of reading them and
matching them to a slide's tiles (``wsi_her2.score.roi.region_groups``), each in a fresh process.

Cases (a 200,000 x 180,000 px slide, 448 px tiles at level 0: 179,246 tiles):

- ``vertices``: one polygon of 10^6 vertices (a wavy disc of radius 60,000 px), 67 s before the
  regions were cut into pieces behind a spatial index;
- ``features``: 10^5 small named squares (500 px, every one named ``Tumor``: the worst case for
  making names unique), 366 s before names were made unique in one pass;
- ``gzip_bomb``: a ``.geojson.gz`` of 30 kB that decompresses to 600 MiB: refused at the 512 MiB
  cap, read in 1 MiB blocks (it was decompressed whole: 3.7 GB).

Each must run in under 10 s and 1 GB of peak RSS (the process's, imports included). Prints one
table; a benchmark, not a test: nothing is asserted against the clock.

    PYTHONPATH=. python benchmarks/bench_roi.py            # ~1-2 min on 2 cores, files in $WSI_HER2_BENCH_DIR/roi
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

WIDTH_PX, HEIGHT_PX, TILE_PX = 200_000, 180_000, 448
BUDGET_S, BUDGET_MB = 10.0, 1024.0


def write_vertices_case(path: Path, n_vertices: int = 10**6) -> None:
    t = np.linspace(0.0, 2 * np.pi, n_vertices, endpoint=False)
    radius = 60_000 * (1 + 0.05 * np.sin(50 * t))
    ring = np.round(np.c_[WIDTH_PX / 2 + radius * np.cos(t), HEIGHT_PX / 2 + radius * np.sin(t)], 2)
    ring = np.vstack([ring, ring[:1]])
    feature = {"type": "Feature", "properties": {"name": "tumour", "classification": {"name": "Tumor"}},
               "geometry": {"type": "Polygon", "coordinates": [ring.tolist()]}}
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))


def write_features_case(path: Path, n_features: int = 10**5, side_px: int = 500, step_px: int = 600) -> None:
    cols = WIDTH_PX // step_px
    features = []
    for k in range(n_features):
        x, y = (k % cols) * step_px, (k // cols) * step_px
        ring = [[x, y], [x + side_px, y], [x + side_px, y + side_px], [x, y + side_px], [x, y]]
        features.append({"type": "Feature", "properties": {"name": "Tumor", "classification": {"name": "Tumor"}},
                         "geometry": {"type": "Polygon", "coordinates": [ring]}})
    path.write_text(json.dumps(features))


def write_gzip_bomb(path: Path, mib: int = 600) -> None:
    block = b" " * (1 << 20)
    with gzip.open(path, "wb", compresslevel=9) as fh:
        fh.write(b"[")
        for _ in range(mib):
            fh.write(block)
        fh.write(b"]")


def fake_store() -> SimpleNamespace:
    cols, rows = WIDTH_PX // TILE_PX, HEIGHT_PX // TILE_PX
    r, c = np.divmod(np.arange(rows * cols), cols)
    coords = np.stack([c * TILE_PX, r * TILE_PX], axis=1).astype(np.int64)
    return SimpleNamespace(attrs={"slide": {"width_px": WIDTH_PX, "height_px": HEIGHT_PX, "bounds_offset_px": [0, 0]}},
                           coords_level0=coords, tile_size_level0=float(TILE_PX))


def child(path: Path) -> dict:
    """Time region_groups on ``path`` in this (fresh) process; peak RSS includes the imports."""
    import shapely  # noqa: F401  (imports out of the timed part, as in a score run)

    from wsi_her2.errors import ConfigError
    from wsi_her2.score.roi import region_groups

    store = fake_store()
    t0 = time.perf_counter()
    try:
        groups = region_groups(store, path)
        outcome = f"{len(groups.names):,} regions, {int(groups.inside.sum()):,} of {len(store.coords_level0):,} tiles inside"
    except ConfigError as exc:
        outcome = f"refused: {str(exc).split(': ', 1)[-1][:70]}..."
    seconds = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": seconds, "peak_rss_mb": peak_mb, "outcome": outcome}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=os.environ.get("WSI_HER2_BENCH_DIR", "bench-out"))
    p.add_argument("--cases", nargs="+", default=["vertices", "features", "gzip_bomb"])
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(Path(args.child))))
        return 0
    data = Path(args.data_dir) / "roi"
    data.mkdir(parents=True, exist_ok=True)
    writers = {"vertices": ("vertices.geojson", write_vertices_case), "features": ("features.geojson", write_features_case),
               "gzip_bomb": ("bomb.geojson.gz", write_gzip_bomb)}
    results = {}
    for case in args.cases:
        name, write = writers[case]
        if not (data / name).is_file():
            write(data / name)
        proc = subprocess.run([sys.executable, __file__, "--child", str(data / name)], capture_output=True, text=True,
                              env=dict(os.environ, PYTHONPATH=os.environ.get("PYTHONPATH", ".")))
        if proc.returncode:
            raise SystemExit(f"{case}: {proc.stderr[-2000:]}")
        results[case] = (data / name, json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"--roi hostile inputs, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}; budget {BUDGET_S:g} s and {BUDGET_MB:g} MB each")
    print("| case | file | seconds | peak RSS (MB) | within budget | outcome |")
    print("|---|---|---|---|---|---|")
    for case, (path, r) in results.items():
        ok = r["seconds"] < BUDGET_S and r["peak_rss_mb"] < BUDGET_MB
        print(f"| {case} | {path.stat().st_size / 2**20:.1f} MiB | {r['seconds']:.2f} | {r['peak_rss_mb']:.0f} | "
              f"{'yes' if ok else 'NO'} | {r['outcome']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
