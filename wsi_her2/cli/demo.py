"""``wsi-her2 demo``: the bundled default job, end to end, with nothing of the user's needed.

Generates the bundled synthetic HER2 IHC slide (deterministic: planted 2+ call), tiles it,
scores it with the default rule-based IHC scorer, and prints the slide call and where the
QuPath overlay, tables and pictures are.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="tile and score the bundled synthetic IHC slide end to end (no data needed)")
    p.add_argument("-o", "--out", default="wsi-her2-out/demo", help="output directory (default ./wsi-her2-out/demo)")
    p.add_argument("--agg", choices=("vote", "mean", "asco"), default="asco")
    p.add_argument("--workers", type=int, default=None)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from wsi_her2.score.pipeline import ScoreConfig, score_store
    from wsi_her2.synthetic.slides import demo_spec, write_synthetic_slide
    from wsi_her2.tile.pipeline import TileConfig, default_workers, tile_slide

    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slide = out / "demo-her2-ihc.svs"
    if not slide.exists():
        write_synthetic_slide(slide, demo_spec())
    from wsi_her2.cli.common import use_worker_threads_for_opencv

    use_worker_threads_for_opencv()
    tiled = tile_slide(slide, out, config=TileConfig(workers=args.workers or default_workers()))
    from wsi_her2.cli.common import use_one_torch_thread_on_cpu
    from wsi_her2.score.scorer import DEFAULT_MODEL

    use_one_torch_thread_on_cpu(DEFAULT_MODEL, "auto")
    res = score_store(tiled.store, config=ScoreConfig(agg=args.agg, overwrite=True))
    c = res.call
    print(f"{'slide':<14} {slide}  (synthetic; planted call HER2 2+)")
    print(f"{'tiles':<14} {tiled.n_tiles} cut, {tiled.n_passed} passed QC")
    print(f"{'call':<14} HER2 {c.her2_score}  (confidence {c.confidence:.2f}, aggregation {args.agg})")
    print(f"{'fractions':<14} " + "  ".join(f"{k}: {v:.2f}" for k, v in c.class_fractions.items()))
    for name, path in res.outputs.items():
        print(f"{name.replace('_', ' '):<14} {path}")
    print(f"{'qc picture':<14} {out / (tiled.store.name.removesuffix('.zarr') + '.qc.png')}")
    print(f"{'done in':<14} {time.perf_counter() - t0:.1f} s")
    return 0
