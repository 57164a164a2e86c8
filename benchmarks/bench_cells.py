"""What ``score --cells`` costs on a large slide: time and peak memory with and without it, in one run.

On one synthetic IHC slide (``wsi_her2.synthetic.bench_spec``, default 40,000 x 30,000 px at
0.5 µm/px, generated once and cached like ``bench_tile.py``'s, tiled once), ``wsi-her2 score``
runs in a fresh interpreter twice per repeat, without and with ``--cells`` (every scored cell
as a QuPath detection in ``<id>.cells.geojson.gz`` and a row of ``<id>.cells.parquet``), the
best of ``--repeats`` kept. Printed: cells written, seconds, peak RSS of the process tree, the
ratio with / without, and the output sizes. The cell table is held in memory at ~50 bytes a
cell; the writers stream blocks of 20,000 cells, so their own memory does not grow with the slide.

    PYTHONPATH=. python benchmarks/bench_cells.py                         # 40000 x 30000
    PYTHONPATH=. python benchmarks/bench_cells.py --width 8000 --height 6000   # quick
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_tile import DATA_DIR, _fresh_dir, ensure_slide, project_env, run_ours, run_tool  # noqa: E402


def score_runner(store: str, out_dir: str, cells: bool) -> int:
    """The child: ``wsi-her2 score`` (with ``--cells`` or not), one JSON line."""
    from wsi_her2.cli import main as cli_main

    t0 = time.perf_counter()
    rc = cli_main(["score", store, "-o", out_dir, "--force", "--overwrite", "-q", *(["--cells"] if cells else [])])
    seconds = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"wsi-her2 score exited with {rc}")
    n_cells = 0
    parquet = next(Path(out_dir).glob("*.cells.parquet"), None)
    if parquet is not None:
        import pyarrow.parquet as pq

        n_cells = pq.ParquetFile(parquet).metadata.num_rows
    sizes = {p.name.split(".", 1)[1]: p.stat().st_size for p in Path(out_dir).glob("*.cells.*")}
    print(json.dumps({"tool": "wsi-her2 score" + (" --cells" if cells else ""), "seconds": round(seconds, 3),
                      "cells": n_cells, "sizes": sizes}), flush=True)
    return 0


def run_score(store: Path, out_dir: Path, *, cells: bool) -> dict:
    _fresh_dir(out_dir)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--run-score", str(store), str(out_dir), "1" if cells else "0"]
    return run_tool(cmd, env=project_env())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=40000)
    p.add_argument("--height", type=int, default=30000)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--data-dir", type=Path, default=DATA_DIR)
    args = p.parse_args(argv)
    slide = ensure_slide(args.width, args.height, data_dir=args.data_dir)
    work = args.data_dir / "cells"
    tiled = run_ours(slide, workers=os.cpu_count() or 1, out_dir=work / "store", codec="jpeg")
    store = next((work / "store").glob("*.zarr"))
    print(f"slide {slide.name}: {tiled.get('tiles', '?')} tiles; load average {os.getloadavg()[0]:.1f}", flush=True)
    best: dict[bool, dict] = {}
    for _ in range(args.repeats):
        for cells in (False, True):
            r = run_score(store, work / ("with" if cells else "without"), cells=cells)
            if "error" in r:
                raise SystemExit(r["error"])
            if cells not in best or r["wall_s"] < best[cells]["wall_s"]:
                best[cells] = r
    off, on = best[False], best[True]
    print(f"{'run':<24} {'cells':>10} {'wall s':>8} {'peak RSS MB':>12}")
    for r in (off, on):
        print(f"{r['tool']:<24} {r.get('cells', 0):>10,} {r['wall_s']:>8.1f} {r['peak_tree_rss_mb']:>12.0f}")
    print(f"--cells / without: time {on['wall_s'] / off['wall_s']:.2f}x, peak RSS {on['peak_tree_rss_mb'] / off['peak_tree_rss_mb']:.2f}x; "
          f"{on['cells'] / max(on['wall_s'] - off['wall_s'], 1e-9):,.0f} cells/s written; outputs "
          + ", ".join(f"{k} {v / 1e6:.0f} MB" for k, v in on.get("sizes", {}).items())
          + f"; load average {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--run-score":
        raise SystemExit(score_runner(sys.argv[2], sys.argv[3], sys.argv[4] == "1"))
    raise SystemExit(main())
