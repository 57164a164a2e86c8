"""Run wsi-her2's tile stage on one slide and print the runner JSON line.

Runs in the project's own environment (``PYTHONPATH`` pointing at the repository). It runs
the command line ``wsi-her2 tile SLIDE -o OUT_DIR --workers N --overwrite -q --codec C --mpp 0.5
--tile-px 224`` in this interpreter (``wsi_her2.cli.main``; ``tile_pipeline.tile_slide`` directly
when the build has no ``tile`` command): tissue detection, every 224 px tile at 0.5 µm/px over
tissue, per-tile QC, the zarr store and the QC picture written.

    python benchmarks/peers/run_wsi_her2.py SLIDE OUT_DIR --workers 2 [--codec jpeg]
"""
from __future__ import annotations

import time

t_import = time.perf_counter()

from _common import emit, runner_parser  # noqa: E402


def main() -> None:
    parser = runner_parser(__doc__.split("\n")[0])
    parser.add_argument("--codec", default="jpeg")
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args()

    from wsi_her2 import __version__
    from wsi_her2.store.patch_store import PatchStore
    from wsi_her2.tile.pipeline import TileConfig, store_path_for, tile_slide

    imports_s = time.perf_counter() - t_import
    try:
        import wsi_her2.cli.tile  # noqa: F401
        from wsi_her2.cli import main as cli_main

        via = "cli"
    except ImportError:
        via = "function"
    t0 = time.perf_counter()
    if via == "cli":
        argv = ["tile", args.slide, "-o", args.out_dir, "--workers", str(args.workers), "--overwrite", "-q",
                "--codec", args.codec, "--mpp", str(args.mpp), "--tile-px", str(args.tile_px), "--backend", args.backend]
        rc = cli_main(argv)
        if rc != 0:
            raise SystemExit(f"wsi-her2 {' '.join(argv)} exited with {rc}")
    else:
        config = TileConfig(target_mpp_um=args.mpp, tile_px=args.tile_px, workers=args.workers, codec=args.codec,
                            backend=args.backend, overwrite=True)
        tile_slide(args.slide, args.out_dir, config=config)
    seconds = time.perf_counter() - t0
    store = PatchStore.open(store_path_for(args.slide, args.out_dir))
    attrs = store.attrs
    emit(
        tool="wsi-her2", version=__version__, tiles=store.n_tiles, seconds=seconds, processes=args.workers,
        passed=int(store.qc_pass.sum()), store=str(store.path), imports_s=round(imports_s, 3), via=via,
        stage_s=attrs.get("timings_s", {}), reader=attrs.get("slide", {}).get("reader"),
        what="tissue mask, all tiles over tissue read + QC'd + written to a zarr store (codec %s)" % args.codec,
    )


if __name__ == "__main__":
    main()
