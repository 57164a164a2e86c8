"""Peer: LazySlide (``pip install lazyslide``) tiling one slide; prints the runner JSON line.

Run with ``$WSI_HER2_PEER_VENVS/lazyslide/bin/python``. What it does, with LazySlide's own API:
``open_wsi`` -> ``pp.find_tissues(method="entropy")`` (its default Otsu method misses most of
the pale synthetic tissue) -> ``pp.tile_tissues(224, mpp=0.5)`` -> read every tile's pixels
through ``wsi.ds.tile_images()`` (the torch Dataset its feature extraction uses), with a
``DataLoader`` of ``--workers`` processes (``--workers 1``: read in this process). Pixels are
read and decoded, not written anywhere (LazySlide has no tile store of its own).
"""
from __future__ import annotations

import time

t_import = time.perf_counter()

from _common import Stopwatch, emit, runner_parser  # noqa: E402


def _keep_images(batch: list[dict]) -> list:
    return [item["image"] for item in batch]


def main() -> None:
    parser = runner_parser(__doc__.split("\n")[0])
    args = parser.parse_args()

    import lazyslide as zs
    from torch.utils.data import DataLoader

    sw = Stopwatch()
    imports_s = time.perf_counter() - t_import
    t0 = time.perf_counter()
    with sw.lap("open"):
        wsi = zs.open_wsi(args.slide, store=None)
    with sw.lap("tissue"):
        zs.pp.find_tissues(wsi, method="entropy")
    with sw.lap("tile_coords"):
        zs.pp.tile_tissues(wsi, args.tile_px, mpp=args.mpp)
    n = 0
    with sw.lap("read_tiles"):
        ds = wsi.ds.tile_images()
        workers = 0 if args.workers <= 1 else args.workers
        loader = DataLoader(ds, batch_size=64, num_workers=workers, collate_fn=_keep_images)
        for batch in loader:
            for image in batch:
                if image.shape[:2] != (args.tile_px, args.tile_px):
                    raise SystemExit(f"unexpected tile shape {image.shape}")
            n += len(batch)
    seconds = time.perf_counter() - t0
    emit(
        tool="lazyslide", version=zs.__version__, tiles=n, seconds=seconds, processes=max(1, args.workers),
        imports_s=round(imports_s, 3), stage_s=sw.laps, reader=type(wsi.reader).__name__,
        what="entropy tissue mask, 224 px tiles at 0.5 µm/px, pixels read via its torch Dataset (not stored)",
    )


if __name__ == "__main__":
    main()
