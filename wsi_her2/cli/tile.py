"""``wsi-her2 tile``: slides -> quality-checked zarr patch stores."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from wsi_her2.cli.common import add_tile_options, tile_config_from_args, use_worker_threads_for_opencv
from wsi_her2.cli.exits import EachItem


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tile", help="cut tiles at a physical resolution into a zarr patch store",
                       description="Tile slides into <out>/<slide-id>.zarr with per-tile QC and a QC picture.")
    p.add_argument("slides", nargs="+", help="slide files (SVS, TIFF, NDPI, MRXS, ...) or DICOM slides (a slide's folder of .dcm files, or one of them)")
    p.add_argument("-o", "--out", default="wsi-her2-out", help="output directory (default ./wsi-her2-out)")
    p.add_argument("--workers", type=int, default=None, help="worker threads (default: cores, at most 8)")
    p.add_argument("--overwrite", action="store_true", help="redo slides whose store is already complete")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_tile_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from wsi_her2.files import check_unique_slide_ids
    from wsi_her2.tile.pipeline import default_workers, slide_id_for, tile_slide

    workers = args.workers or default_workers()
    use_worker_threads_for_opencv()
    # a bad option is one error, not one per slide
    config = tile_config_from_args(args, workers=workers, progress=not args.quiet and sys.stderr.isatty())
    config.validate()
    check_unique_slide_ids(args.slides, slide_id_for)  # two slides may not share one store
    each = EachItem("tile", args.slides, lambda slide: tile_slide(slide, Path(args.out), config=config), noun="slides")
    for _, res in each:
        rate = res.n_tiles / res.seconds if res.seconds > 0 else 0.0
        extra = "" if res.status == "skipped" else f" in {res.seconds:.1f} s ({rate:.0f} tiles/s)"
        print(f"{res.store}: {res.status}, {res.n_tiles} tiles, {res.n_passed} passed QC{extra}")
    return each.exit_code()
