"""Tile one slide into a patch store: open -> MPP -> tissue -> plan -> read+QC in parallel -> store.

The store is written in *work units* (one chunk of ``chunk_tiles`` tiles each). Units are
independent, so worker processes write their own chunks, and an interrupted run resumes by
doing only the units not yet marked done; the result is identical to an uninterrupted run
because every unit's content depends only on the slide and the settings.
"""
from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import shlex
import sys
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from wsi_her2 import __version__
from wsi_her2.errors import ConfigError, NoTissueError, SlideOpenError, StoreError
from wsi_her2.pixels import read_thumbnail, read_tiles
from wsi_her2.qc import QcParams, slide_qc_summary, tile_qc
from wsi_her2.qc_picture import render_qc_picture, save_qc_picture
from wsi_her2.slide import open_slide
from wsi_her2.slide.mpp import read_mpp_csv, resolve_mpp
from wsi_her2.store import TILE_CODECS, PatchStore
from wsi_her2.tiling import TileGeometry, choose_geometry, mask_coverage, plan_tiles
from wsi_her2.tissue import TissueParams, detect_tissue

log = logging.getLogger(__name__)


@dataclass
class TileConfig:
    """Every setting of the tile stage (the CLI fills it; the store records it)."""

    target_mpp_um: float = 0.5
    tile_px: int = 224
    stride_px: int | None = None  # None: tile_px (no overlap)
    backend: str = "auto"
    slide_mpp_um: float | None = None  # user override of the slide's pixel size
    mpp_csv: str | None = None  # per-slide pixel sizes (columns slide, mpp)
    workers: int = 1
    chunk_tiles: int = 64
    block_tiles: int = 8
    codec: str = "zstd"
    thumb_mpp_um: float = 8.0
    min_mask_fraction: float = 0.05
    mpp_tolerance: float = 0.025
    tissue: TissueParams = field(default_factory=TissueParams)
    qc: QcParams = field(default_factory=QcParams)
    overwrite: bool = False
    progress: bool = False
    qc_png: bool = True

    def validate(self) -> None:
        if self.codec not in TILE_CODECS:
            raise ConfigError(f"--codec {self.codec!r}: choose one of {', '.join(TILE_CODECS)}")
        if self.chunk_tiles < 1 or self.block_tiles < 1 or self.workers < 1:
            raise ConfigError("--chunk-tiles, --block-tiles and --workers must be >= 1")
        if self.stride_px is not None and self.stride_px < 1:
            raise ConfigError("--stride-px must be >= 1")


@dataclass
class TileResult:
    slide: Path
    store: Path
    status: str  # "tiled" | "resumed" | "skipped"
    n_tiles: int
    n_passed: int
    seconds: float


def slide_id_for(path: Path) -> str:
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def sha256_file(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def store_path_for(slide: Path, out_dir: Path) -> Path:
    return Path(out_dir) / f"{slide_id_for(Path(slide))}.zarr"


# --- worker side ------------------------------------------------------------------------------
# Per-thread worker state: a pool worker initialises it once; an in-process run (workers=1,
# e.g. inside a dask worker that tiles several slides on several threads) gets its own copy.
_LOCAL = threading.local()


def _w() -> dict:
    return _LOCAL.__dict__


def _worker_init(slide: str, backend: str, store: str, geometry: dict, glass: list, tissue: dict, qc: dict, block_tiles: int) -> None:
    _w()["reader"] = open_slide(slide, backend=backend)
    _w()["store"] = PatchStore.open(store, require_complete=False, mode="r+")
    _w()["geometry"] = TileGeometry(**{k: v for k, v in geometry.items() if k != "tile_size_level0"})
    _w()["glass"] = np.asarray(glass, np.float32)
    _w()["tissue"] = TissueParams(**tissue)
    _w()["qc"] = QcParams(**qc)
    _w()["grid_rc"] = _w()["store"].grid_rc
    _w()["block_tiles"] = block_tiles


def _process_unit(unit: int) -> tuple[int, int, int]:
    store: PatchStore = _w()["store"]
    start = unit * store.chunk_tiles
    stop = min(store.n_tiles, start + store.chunk_tiles)
    grid = _w()["grid_rc"][start:stop]
    bt = _w()["block_tiles"]
    blocks = (grid[:, 0] // bt) * 1_000_003 + grid[:, 1] // bt
    tiles = np.empty((stop - start, store.tile_px, store.tile_px, 3), np.uint8)
    try:
        for b in np.unique(blocks):
            sel = np.nonzero(blocks == b)[0]
            tiles[sel] = read_tiles(_w()["reader"], geometry=_w()["geometry"], grid_rc=grid[sel])
    except Exception as exc:
        raise SlideOpenError(
            f"{_w()['reader'].path}: cannot read pixels near tile {start} ({type(exc).__name__}: {exc}); "
            "the file may be truncated or corrupt: re-copy it"
        ) from exc
    qc = tile_qc(tiles, glass_rgb=_w()["glass"], tissue_params=_w()["tissue"], qc_params=_w()["qc"])
    store.write_unit(
        unit,
        tiles,
        {"tissue_fraction": qc.tissue_fraction, "laplacian_var": qc.laplacian_var, "pen_fraction": qc.pen_fraction, "qc_flags": qc.flags},
    )
    return unit, stop - start, int(qc.passed.sum())


# --- orchestration ------------------------------------------------------------------------------
def _fingerprint(slide_sha: str, slide_mpp: float, config: TileConfig, geometry: TileGeometry) -> str:
    relevant = {
        "slide_sha256": slide_sha,
        "slide_mpp_um": slide_mpp,
        "geometry": geometry.to_dict(),
        "chunk_tiles": config.chunk_tiles,
        "block_tiles": config.block_tiles,
        "codec": config.codec,
        "thumb_mpp_um": config.thumb_mpp_um,
        "min_mask_fraction": config.min_mask_fraction,
        "tissue": config.tissue.to_dict(),
        "qc": config.qc.to_dict(),
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()


def tile_slide(slide: str | Path, out_dir: str | Path, *, config: TileConfig | None = None) -> TileResult:
    """Tile ``slide`` into ``out_dir/<slide-id>.zarr`` (and ``<slide-id>.qc.png``); resume if interrupted."""
    config = config or TileConfig()
    config.validate()
    t_start = time.perf_counter()
    slide = Path(slide)
    out_dir = Path(out_dir)
    store_path = store_path_for(slide, out_dir)
    if store_path.exists() and not config.overwrite:
        try:
            done = PatchStore.open(store_path, require_complete=False)
            meta = done.attrs
            if meta.get("complete"):
                log.info("%s: complete store exists, skipping (use --overwrite to redo)", store_path)
                qc_summary = meta.get("qc", {}).get("summary", {})
                return TileResult(slide, store_path, "skipped", done.n_tiles, int(qc_summary.get("n_passed", 0)), 0.0)
        except StoreError:
            pass  # unreadable leftovers: rebuilt below

    reader = open_slide(slide, backend=config.backend)
    with reader:
        table = read_mpp_csv(config.mpp_csv) if config.mpp_csv else None
        mpp = resolve_mpp(reader, override_mpp_um=config.slide_mpp_um, mpp_table=table, mpp_table_name=str(config.mpp_csv))
        level_dims = [(lv.width_px, lv.height_px) for lv in reader.levels]
        geometry = choose_geometry(
            level_dims=level_dims,
            level_downsamples=[lv.downsample for lv in reader.levels],
            slide_mpp_um=mpp.mpp_um,
            target_mpp_um=config.target_mpp_um,
            tile_px=config.tile_px,
            stride_px=config.stride_px,
            mpp_tolerance=config.mpp_tolerance,
        )
        log.info(
            "%s: %s µm/px (%s) -> tiles of %d px at %.4f µm/px from level %d (resize x%.3f)",
            slide.name, mpp.mpp_um, mpp.source, geometry.tile_px, geometry.effective_mpp_um,
            geometry.level, 1 / geometry.level_px_per_target_px,
        )
        t0 = time.perf_counter()
        slide_sha = sha256_file(slide)
        t_hash = time.perf_counter() - t0
        t0 = time.perf_counter()
        try:
            thumb, thumb_scale = read_thumbnail(reader, slide_mpp_um=mpp.mpp_um, thumb_mpp_um=config.thumb_mpp_um)
        except Exception as exc:  # decoder errors from a damaged file: one clear line, not a traceback
            raise SlideOpenError(
                f"{slide}: cannot read the slide's pixels ({type(exc).__name__}: {exc}); "
                "the file may be truncated or corrupt: re-copy it"
            ) from exc
        thumb_mpp = mpp.mpp_um / thumb_scale
        tissue = detect_tissue(thumb, thumb_mpp_um=thumb_mpp, params=config.tissue)
        coverage = mask_coverage(tissue.mask, geometry=geometry, thumb_px_per_level0_px=thumb_scale)
        plan = plan_tiles(coverage, geometry=geometry, min_mask_fraction=config.min_mask_fraction, block_tiles=config.block_tiles)
        t_plan = time.perf_counter() - t0
        if plan.n_tiles == 0:
            raise NoTissueError(
                f"{slide}: no tissue found (tissue area {tissue.tissue_area_mm2:.3f} mm², grid {geometry.grid_cols}x"
                f"{geometry.grid_rows} tiles); check the slide, or lower --min-od / raise --max-gray if the stain is very pale"
            )
        fingerprint = _fingerprint(slide_sha, mpp.mpp_um, config, geometry)
        store = _open_or_create(
            store_path, config=config, fingerprint=fingerprint, plan=plan, geometry=geometry, thumb=thumb,
            tissue=tissue, thumb_scale=thumb_scale, slide=slide, slide_sha=slide_sha, mpp=mpp, reader=reader,
        )
    pending = [u for u, done in enumerate(store.units_done()) if not done]
    status = "resumed" if len(pending) < store.n_units else "tiled"
    t0 = time.perf_counter()
    _run_units(slide, store, pending, config=config, geometry=geometry, glass=tissue.glass_rgb)
    t_tiles = time.perf_counter() - t0

    flags = store.array("qc_flags")
    summary = slide_qc_summary(grid_rc=plan.grid_rc, flags=flags, pen_area_mm2=tissue.pen_area_mm2, qc_params=config.qc)
    if config.qc_png:
        picture = render_qc_picture(
            thumb, tissue_mask=tissue.mask, pen_mask=tissue.pen, coords_level0=plan.coords_level0,
            tile_size_level0=geometry.tile_size_level0, thumb_px_per_level0_px=thumb_scale, qc_flags=flags,
            title=f"{slide_id_for(slide)}: {summary['n_passed']}/{plan.n_tiles} tiles kept",
        )
        save_qc_picture(picture, out_dir / f"{slide_id_for(slide)}.qc.png")
    meta = store.attrs
    meta["qc"]["summary"] = summary
    meta["timings_s"] = {
        "hash": round(t_hash, 3), "thumbnail_and_plan": round(t_plan, 3), "tiles": round(t_tiles, 3),
        "total": round(time.perf_counter() - t_start, 3),
    }
    meta["complete"] = True  # last write: only now does the store count as done
    store.update_attrs(**meta)
    return TileResult(slide, store_path, status, plan.n_tiles, summary["n_passed"], time.perf_counter() - t_start)


def _open_or_create(store_path: Path, *, config: TileConfig, fingerprint: str, plan, geometry, thumb, tissue, thumb_scale, slide, slide_sha, mpp, reader) -> PatchStore:
    if store_path.exists() and not config.overwrite:
        try:
            old = PatchStore.open(store_path, require_complete=False, mode="r+")
            if old.attrs.get("plan_fingerprint") == fingerprint:
                log.info("%s: resuming (%d of %d units done)", store_path.name, int(old.units_done().sum()), old.n_units)
                return old
            log.info("%s: settings or slide changed since the interrupted run; starting over", store_path.name)
        except StoreError:
            log.info("%s: unreadable leftovers; starting over", store_path.name)
    store_path.parent.mkdir(parents=True, exist_ok=True)
    attrs = {
        "package": "wsi-her2",
        "package_version": __version__,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        "plan_fingerprint": fingerprint,
        "slide": {
            "id": slide_id_for(slide),
            "path": str(Path(slide).resolve()),
            "sha256": slide_sha,
            "size_bytes": Path(slide).stat().st_size,
            "reader": reader.backend,
            "reader_version": reader.backend_version,
            "vendor": reader.vendor,
            "width_px": reader.dimensions[0],
            "height_px": reader.dimensions[1],
            "level_downsamples": [lv.downsample for lv in reader.levels],
            "mpp_um": mpp.mpp_um,
            "mpp_source": mpp.source,
            "bounds_offset_px": list(reader.bounds_offset_px),
        },
        "tiling": dict(
            geometry.to_dict(), block_tiles=config.block_tiles, min_mask_fraction=config.min_mask_fraction,
            n_tiles=plan.n_tiles, mpp_tolerance=config.mpp_tolerance,
        ),
        "thumbnail": {"mpp_um": mpp.mpp_um / thumb_scale, "px_per_level0_px": thumb_scale},
        "tissue": {
            "params": config.tissue.to_dict(), "glass_rgb": [float(v) for v in tissue.glass_rgb],
            "tissue_area_mm2": round(tissue.tissue_area_mm2, 4), "tissue_fraction_of_slide": round(tissue.tissue_fraction, 4),
        },
        "qc": {"params": config.qc.to_dict(), "flags": {"low_tissue": 1, "blurry": 2, "pen": 4}},
    }
    return PatchStore.create(
        store_path, n_tiles=plan.n_tiles, tile_px=geometry.tile_px, chunk_tiles=config.chunk_tiles, codec=config.codec,
        attrs=attrs,
        per_tile={"coords_level0": plan.coords_level0, "grid_rc": plan.grid_rc, "mask_fraction": plan.mask_fraction},
        images={"thumbnail": thumb, "tissue_mask": tissue.mask, "pen_mask": tissue.pen},
    )


def _run_units(slide: Path, store: PatchStore, pending: list[int], *, config: TileConfig, geometry: TileGeometry, glass) -> None:
    if not pending:
        return
    init_args = (
        str(slide), config.backend, str(store.path), geometry.to_dict(), [float(g) for g in glass],
        config.tissue.to_dict(), config.qc.to_dict(), config.block_tiles,
    )
    bar = _progress(total=len(pending), enabled=config.progress, desc=slide_id_for(slide))
    # a spawned worker costs ~1-2 s of imports: only worth it with a few units each
    workers = min(config.workers, max(1, len(pending) // 4))
    try:
        if workers <= 1:
            _worker_init(*init_args)
            try:
                for unit in pending:
                    _process_unit(unit)
                    bar.update(1)
            finally:
                _w()["reader"].close()
                _w().clear()
            return
        # spawn, not fork: zarr runs an event-loop thread that must not be forked mid-flight
        ctx = mp.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init, initargs=init_args) as pool:
            futures = [pool.submit(_process_unit, u) for u in pending]
            for fut in _as_completed_fail_fast(futures):
                fut.result()
                bar.update(1)
    finally:
        bar.close()


def _as_completed_fail_fast(futures):
    pending = set(futures)
    while pending:
        done, pending = wait(pending, return_when=FIRST_EXCEPTION)
        for fut in done:
            if fut.exception() is not None:
                for other in pending:
                    other.cancel()
                raise fut.exception()
            yield fut


def _progress(*, total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="chunk", leave=False, file=sys.stderr)


def default_workers() -> int:
    return max(1, min(len(os.sched_getaffinity(0)), 8))
