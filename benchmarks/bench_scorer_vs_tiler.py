"""Scoring against tiling on the same slide and the same cores, in one run: is scoring the wait?

Back to back, per core count ``N`` (default: 1 and all cores), on one synthetic IHC slide
(``wsi_her2.synthetic.bench_spec``, 0.5 µm/px, generated once and cached like bench_tile.py's),
both commands pinned to the same ``N`` CPUs (CPU affinity, inherited by every thread and process
they start; ``--no-pin`` leaves them free), so that ``N`` cores means ``N`` cores for both:

1. ``wsi-her2 tile SLIDE -o OUT --workers N --overwrite -q --mpp 0.5 --tile-px 224`` (jpeg codec)
   in a fresh interpreter (``benchmarks/peers/run_wsi_her2.py``);
2. ``wsi-her2 score STORE -o OUT --force --overwrite -q`` (the default scorer ``ihc_dab`` on the
   CPU) in a fresh interpreter with ``OMP_NUM_THREADS=N``; it scores chunk by chunk on the ``N``
   CPUs it may run on (itself and ``N - 1`` worker processes); ``--force`` because the bench slide holds an H&E region that
   the stain check would refuse.

The ratio that matters is **score rate / tile rate over the same store's tiles**, i.e. tiling
time / scoring time for the same slide: >= 1 means scoring a slide takes no longer than tiling
it. It is given three ways: stage (the command's own work, after imports), command (wall time of
the whole process, interpreter start to exit) and CPU (user + system seconds of each process
tree, the figure a busy shared machine disturbs least). Tile and score alternate ``--repeats``
times and the best time of each is kept (a shared machine only ever makes runs slower). Load
averages are printed with the numbers.

    PYTHONPATH=. python benchmarks/bench_scorer_vs_tiler.py                      # 20000 x 15000, N = 1 and all cores
    PYTHONPATH=. python benchmarks/bench_scorer_vs_tiler.py --width 8000 --height 6000 --workers 2   # quick
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_tile import DATA_DIR, _fresh_dir, ensure_slide, project_env, run_ours, run_tool  # noqa: E402


def run_score(store: Path, out_dir: Path, *, threads: int) -> dict:
    """``wsi-her2 score`` in a fresh interpreter with ``threads`` torch threads; the runner JSON line."""
    _fresh_dir(out_dir)
    env = project_env()
    env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--run-score", str(store), str(out_dir)]
    return run_tool(cmd, env=env)


def score_runner(store: str, out_dir: str) -> int:
    """The child: time the imports and ``wsi-her2 score`` apart, print one JSON line."""
    t0 = time.perf_counter()
    import torch

    import wsi_her2.cli.score  # noqa: F401  the command's modules, as the tile runner imports tile's
    import wsi_her2.score.pipeline  # noqa: F401
    from wsi_her2.cli import main as cli_main

    imports_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    rc = cli_main(["score", store, "-o", out_dir, "--force", "--overwrite", "-q"])
    seconds = time.perf_counter() - t1
    if rc != 0:
        raise SystemExit(f"wsi-her2 score exited with {rc}")
    slide_json = next(Path(out_dir).glob("*.json"))
    meta = json.loads(slide_json.read_text())
    from wsi_her2.store.patch_store import open_store

    st = open_store(store)
    print(json.dumps({
        "tool": "wsi-her2 score", "tiles": int(st.n_tiles), "scored": int(st.qc_pass.sum()),
        "seconds": round(seconds, 4), "imports_s": round(imports_s, 3), "threads": torch.get_num_threads(),
        "inference_s": meta.get("timings_s", {}).get("inference"),
    }), flush=True)
    return 0


@contextlib.contextmanager
def pinned(n_cpus: int, *, enabled: bool = True):
    """Run the block with this process (and so every child it starts) on ``n_cpus`` of its CPUs.

    Yields the CPUs used (None: not pinned, because disabled or unsupported here).
    """
    if not enabled or not hasattr(os, "sched_setaffinity"):
        yield None
        return
    before = os.sched_getaffinity(0)
    cpus = set(sorted(before)[:n_cpus])
    os.sched_setaffinity(0, cpus)
    try:
        yield sorted(cpus)
    finally:
        os.sched_setaffinity(0, before)


def _best(runs: list[dict], key: str) -> float:
    return min(r[key] for r in runs)


def measure(slide: Path, *, workers: int, out_root: Path, repeats: int, pin: bool = True) -> dict:
    """Tile then score, ``repeats`` times alternating, on ``workers`` CPUs; the best time of each kind is kept."""
    with pinned(workers, enabled=pin) as cpus:
        row = _measure(slide, workers=workers, out_root=out_root, repeats=repeats)
    row["cpus"] = cpus
    return row


def _measure(slide: Path, *, workers: int, out_root: Path, repeats: int) -> dict:
    load_before = os.getloadavg()
    tiles, scores = [], []
    for _ in range(repeats):
        tile = run_ours(slide, workers=workers, out_dir=out_root / f"tile-{workers}", codec="jpeg")
        if "error" in tile:
            raise SystemExit(f"wsi-her2 tile failed: {tile['error']}")
        score = run_score(Path(tile["store"]), out_root / f"score-{workers}", threads=workers)
        if "error" in score:
            raise SystemExit(f"wsi-her2 score failed: {score['error']}")
        tiles.append(tile)
        scores.append(score)
    n = tiles[0]["tiles"]
    row = {"cores": workers, "tiles": n, "scored": scores[0]["scored"], "repeats": repeats,
           "load_before": [round(v, 2) for v in load_before], "load_after": [round(v, 2) for v in os.getloadavg()],
           "tile": tiles, "score": scores}
    for kind, key in (("stage", "seconds"), ("command", "wall_s"), ("cpu", "cpu_s")):
        row[f"tile_{kind}_tiles_s"] = n / _best(tiles, key)
        row[f"score_{kind}_tiles_s"] = n / _best(scores, key)
        row[f"ratio_{kind}"] = _best(tiles, key) / _best(scores, key)
    return row


def render(rows: list[dict], *, slide: Path) -> str:
    out = [
        f"wsi-her2 scorer vs tiler  {platform.node()}  {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores  {time.strftime('%Y-%m-%d %H:%M')}",
        f"slide: {slide.name}; tiles per store: {rows[0]['tiles']:,} ({rows[0]['scored']:,} pass QC and are scored)",
        f"rates are the store's tiles / the best of {rows[0]['repeats']} alternating runs' seconds; "
        "ratio = score rate / tile rate (>= 1: scoring is not the wait); "
        + ("both commands pinned to the first N CPUs" if rows[0].get("cpus") is not None else "not pinned to CPUs"),
        "",
        "| cores | measure | tile tiles/s | score tiles/s | score/tile | load avg (1 min) before -> after |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        for kind, label in (("stage", "stage (after imports)"), ("command", "command, wall"), ("cpu", "per CPU-second")):
            out.append(
                f"| {r['cores']} | {label} | {r[f'tile_{kind}_tiles_s']:,.0f} | {r[f'score_{kind}_tiles_s']:,.0f} | "
                f"{r[f'ratio_{kind}']:.2f} | {r['load_before'][0]:.2f} -> {r['load_after'][0]:.2f} |"
            )
    out.append("")
    for r in rows:
        best = min(r["score"], key=lambda s: s["seconds"])
        out.append(f"cores {r['cores']}: imports tile {r['tile'][0].get('imports_s', 0):.1f} s, score {best['imports_s']:.1f} s; "
                   f"score stage {best['seconds']:.1f} s of which inference {best['inference_s']} s")
    return "\n".join(out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=20000)
    p.add_argument("--height", type=int, default=15000)
    p.add_argument("--workers", type=int, nargs="+", default=None, help="core counts (default 1 and all cores)")
    p.add_argument("--repeats", type=int, default=3, help="alternating tile/score runs per core count (best kept)")
    p.add_argument("--data-dir", type=Path, default=DATA_DIR)
    p.add_argument("--json-out", type=Path, default=None)
    p.add_argument("--no-pin", action="store_true", help="do not pin each core count's runs to that many CPUs")
    p.add_argument("--run-score", nargs=2, metavar=("STORE", "OUT"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.run_score:
        return score_runner(*args.run_score)
    cores = os.cpu_count() or 1
    workers = args.workers or sorted({1, cores})
    slide = ensure_slide(args.width, args.height, data_dir=args.data_dir)
    out_root = args.data_dir / "out" / "scorer-vs-tiler"
    rows = [measure(slide, workers=n, out_root=out_root, repeats=max(1, args.repeats), pin=not args.no_pin) for n in workers]
    print(render(rows, slide=slide))
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps({"slide": str(slide), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
