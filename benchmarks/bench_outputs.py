"""Score outputs stay linear in tiles: the parquet table, the QuPath GeoJSON and the call heatmap.

Writes the three per-slide outputs of ``wsi-her2 score`` (the writers of ``wsi_her2.outputs.slide_outputs``
that ``score_store`` uses, fed per-tile results) for synthetic slides of growing tile counts (default 10k,
30k, 100k tiles: a 100k-tile slide is ~5 cm² of tissue at 0.5 µm/px), with random calls, QC
reasons and every ihc_dab measurement, and prints seconds and microseconds per tile for each.
Linear writers keep µs/tile flat as the slide grows; the 100k column is the "seconds, not
minutes" check. The thumbnail grows with the slide (~8 µm/px), as the tiler's does.

    PYTHONPATH=. python benchmarks/bench_outputs.py                 # ~1 min on 2 cores
    PYTHONPATH=. python benchmarks/bench_outputs.py --tiles 1000 100000
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from wsi_her2.models.ihc_score import MEASUREMENT_NAMES
from wsi_her2.outputs.slide_outputs import run_side_by_side, write_slide_geojson, write_slide_heatmap
from wsi_her2.outputs.tables import write_tiles_parquet
from wsi_her2.result import PartCall, TileResults
from wsi_her2.tile.qc import QC_FLAGS, reject_reason

CLASSES = ("0", "1+", "2+", "3+")
TILE_LEVEL0_PX = 224  # 224 px tiles at 0.5 µm/px on a 0.5 µm/px slide
THUMB_PX_PER_LEVEL0_PX = 1 / 16


class FakeStore:
    """What the writers read from a :class:`wsi_her2.store.PatchStore`, for ``n`` tiles on a square grid."""

    def __init__(self, n: int, *, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        side = math.ceil(math.sqrt(n))
        rows, cols = np.divmod(np.arange(n), side)
        self.n_tiles = n
        self.slide_id = f"bench-{n}"
        self.grid_rc = np.stack([rows, cols], 1).astype(np.int32)
        self.coords_level0 = (self.grid_rc[:, ::-1] * TILE_LEVEL0_PX).astype(np.int64)
        self.tile_size_level0 = float(TILE_LEVEL0_PX)
        flags = np.where(rng.random(n) < 0.1, rng.choice(list(QC_FLAGS.values()), n), 0).astype(np.uint8)
        self.qc_flags = flags
        self.qc_pass = flags == 0
        thumb_px = math.ceil(side * TILE_LEVEL0_PX * THUMB_PX_PER_LEVEL0_PX)
        self._thumb = rng.integers(150, 255, (thumb_px, thumb_px, 3), dtype=np.uint8)
        self.attrs = {"slide": {"sha256": "0" * 64, "bounds_offset_px": (0, 0)},
                      "thumbnail": {"px_per_level0_px": THUMB_PX_PER_LEVEL0_PX}}

    def array(self, name: str) -> np.ndarray:
        if name != "thumbnail":
            raise KeyError(name)
        return self._thumb


def time_writers(n: int, out: Path) -> dict[str, float]:
    store = FakeStore(n)
    rng = np.random.default_rng(1)
    calls = np.where(store.qc_pass, rng.integers(0, 4, n), -1)
    reasons = [reject_reason(int(f)) for f in store.qc_flags]
    measurements = {name: np.where(store.qc_pass, rng.random(n), np.nan).astype(np.float32) for name in MEASUREMENT_NAMES}
    call = PartCall(her2_score="2+", confidence=0.9, class_fractions={c: 0.25 for c in CLASSES},
                    n_tiles_used=int(store.qc_pass.sum()), method="vote", details={}, her2_category="equivocal",
                    her2_category_text="HER2 2+ equivocal", criteria={})
    tiles = TileResults(CLASSES, calls, reasons, measurements)
    seconds = {}
    t0 = time.perf_counter()
    write_tiles_parquet(out / f"{n}.tiles.parquet", store, tiles)
    seconds["parquet"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    write_slide_geojson(out / f"{store.slide_id}.geojson", store, tiles, call)
    seconds["geojson"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    write_slide_heatmap(out / f"{n}.heatmap.png", store, tiles, call)
    seconds["heatmap"] = time.perf_counter() - t0
    t0 = time.perf_counter()  # the three at once, as `wsi-her2 score` writes them
    run_side_by_side({
        "parquet": lambda: write_tiles_parquet(out / f"{n}.b.tiles.parquet", store, tiles),
        "geojson": lambda: write_slide_geojson(out / f"{store.slide_id}.b.geojson", store, tiles, call),
        "heatmap": lambda: write_slide_heatmap(out / f"{n}.b.heatmap.png", store, tiles, call),
    })
    seconds["side_by_side"] = time.perf_counter() - t0
    return seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiles", type=int, nargs="+", default=[10_000, 30_000, 100_000])
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="wsi-her2-bench-outputs-") as tmp:
        time_writers(1000, Path(tmp))  # first-use costs (pyarrow, PIL) out of the timed runs
        results = {n: time_writers(n, Path(tmp)) for n in args.tiles}
    print(f"score outputs, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}, {time.strftime('%Y-%m-%d %H:%M')}")
    print("| writer | " + " | ".join(f"{n:,} tiles: s (µs/tile)" for n in args.tiles) + " |")
    print("|---|" + "---|" * len(args.tiles))
    for writer in ("parquet", "geojson", "heatmap"):
        cells = [f"{results[n][writer]:.2f} ({results[n][writer] / n * 1e6:.0f})" for n in args.tiles]
        print(f"| {writer} | " + " | ".join(cells) + " |")
    total = [sum(results[n][w] for w in ("parquet", "geojson", "heatmap")) for n in args.tiles]
    print("| all three, one after another | " + " | ".join(f"{t:.2f} ({t / n * 1e6:.0f})" for t, n in zip(total, args.tiles)) + " |")
    both = [results[n]["side_by_side"] for n in args.tiles]
    print("| all three side by side (as `score`) | "
          + " | ".join(f"{b:.2f} ({b / n * 1e6:.0f}; {t / b:.2f}x)" for b, t, n in zip(both, total, args.tiles)) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
