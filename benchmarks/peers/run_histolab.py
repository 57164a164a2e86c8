"""Peer: histolab's GridTiler on one slide; prints the runner JSON line.

Run with ``$WSI_HER2_PEER_VENVS/histolab/bin/python``. What it does, with histolab's own code:
``Slide`` -> ``GridTiler(tile_size=(224, 224), level=0, check_tissue=True)`` over a
``TissueMask`` (all tissue, not only the biggest box), tiles generated in memory through the
tiler's own generator (``--save-png``: ``GridTiler.extract``, its normal path, which also
writes every tile as a PNG). histolab has no parallel path: always one process. The slide
must be at 0.5 µm/px for level 0 to give 0.5 µm/px tiles (the benchmark slide is).
"""
from __future__ import annotations

import time

t_import = time.perf_counter()

from _common import Stopwatch, emit, runner_parser  # noqa: E402


def main() -> None:
    parser = runner_parser(__doc__.split("\n")[0], mpp=False)  # --workers is ignored: histolab tiles in one process
    parser.add_argument("--save-png", action="store_true")
    args = parser.parse_args()

    import openslide_bin  # noqa: F401  (the wheel's library, before histolab imports openslide)
    import histolab
    from histolab.masks import TissueMask
    from histolab.slide import Slide
    from histolab.tiler import GridTiler

    sw = Stopwatch()
    imports_s = time.perf_counter() - t_import
    t0 = time.perf_counter()
    with sw.lap("open"):
        slide = Slide(args.slide, processed_path=args.out_dir)
        tiler = GridTiler(tile_size=(args.tile_px, args.tile_px), level=0, check_tissue=True, pixel_overlap=0,
                          prefix="tile_", suffix=".png")
        mask = TissueMask()
    n = 0
    with sw.lap("tiles"):
        if args.save_png:
            tiler.extract(slide, extraction_mask=mask)
            n = sum(1 for _ in __import__("pathlib").Path(args.out_dir).glob("tile_*.png"))
        else:
            for tile, _coords in tiler._tiles_generator(slide, mask):
                if tiler.check_tissue and not tile.has_enough_tissue(tiler.tissue_percent):
                    continue  # what extract() does before saving
                if tile.image.size != (args.tile_px, args.tile_px):
                    raise SystemExit(f"unexpected tile size {tile.image.size}")
                n += 1
    seconds = time.perf_counter() - t0
    emit(
        tool="histolab", version=histolab.__version__, tiles=n, seconds=seconds, processes=1,
        imports_s=round(imports_s, 3), stage_s=sw.laps,
        what="TissueMask + GridTiler 224 px at level 0 with its tissue check, "
             + ("PNGs written" if args.save_png else "tiles in memory (not stored)"),
    )


if __name__ == "__main__":
    main()
