"""Tile one slide into a patch store: open -> MPP -> tissue -> plan -> read+QC in parallel -> store.

The store is written in *work units* (one chunk of ``chunk_tiles`` tiles each). Units are
independent, so worker threads write their own chunk files, and one coordinating thread
records their QC values and marks them done; an interrupted run resumes by doing only the
units not yet marked done, and the result is identical to an uninterrupted run because every
unit's content depends only on the slide and the settings.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shlex
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from wsi_her2 import __version__
from wsi_her2.cpus import available_cpus
from wsi_her2.errors import ConfigError, NoTissueError, SlideOpenError, StoreError, WsiHer2Error
from wsi_her2.store.no_tissue import clear_record as clear_no_tissue_record
from wsi_her2.store.no_tissue import write_record as write_no_tissue_record
from wsi_her2.files import check_store_slot, prepare_output_dir, remove_tmp_files
from wsi_her2.locks import store_lock
from wsi_her2.tile.pixels import read_thumbnail_or_fail, read_tiles
from wsi_her2.tile.qc import QC_FLAGS, QcParams, TileQc, slide_qc_summary, tile_qc
from wsi_her2.tile.qc_picture import render_qc_picture, save_qc_picture
from wsi_her2.slide import open_slide
from wsi_her2.slide.dicom import dicom_slide, is_dicom_input
from wsi_her2.slide.identity import slide_sha256, slide_stat
from wsi_her2.slide.mpp import read_mpp_csv, resolve_mpp
from wsi_her2.store.patch_store import QC_ARRAYS, STORE_ENTRIES, PatchStore, TileChunkWriter, remove_store
from wsi_her2.store.codecs import DEFAULT_TILE_CODEC, JPEG_MAX_SIDE_PX, JPEG_QUALITY, TILE_CODECS, check_jpeg_quality
from wsi_her2.slide.chroma import level_chroma_factors
from wsi_her2.tile.geometry import TileGeometry, choose_geometry, mask_coverage, plan_tiles
from wsi_her2.tile.tissue import TissueParams, detect_tissue

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
    codec: str = DEFAULT_TILE_CODEC
    jpeg_quality: int = JPEG_QUALITY  # codec "jpeg" only
    thumb_mpp_um: float | None = None  # None: a pyramid level of 4-8 µm/px, else 4 (tile.pixels.auto_thumb_mpp)
    min_mask_fraction: float = 0.05
    mpp_tolerance: float = 0.025
    #: read only levels whose colour is as sharp as the target when one exists (``--allow-subsampled-chroma``: off)
    sharp_chroma: bool = True
    tissue: TissueParams = field(default_factory=TissueParams)
    qc: QcParams = field(default_factory=QcParams)
    overwrite: bool = False
    progress: bool = False
    qc_png: bool = True

    def validate(self) -> None:
        if self.codec not in TILE_CODECS:
            raise ConfigError(f"--codec {self.codec!r}: choose one of {', '.join(TILE_CODECS)}")
        try:
            check_jpeg_quality(self.jpeg_quality)
        except ValueError as exc:
            raise ConfigError(f"--jpeg-quality: {exc}") from exc
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
    """The id that names a slide's outputs: the file name without its extension, or a DICOM slide's
    identifier (container, else specimen, else series; :mod:`wsi_her2.slide.dicom`)."""
    path = Path(path)
    if is_dicom_input(path):
        try:
            return dicom_slide(path).slide_id
        except WsiHer2Error as exc:  # opening it later says the same in its own line, for this slide only
            log.debug("%s: no DICOM identifier (%s); named by its path", path, exc)
            return path.name if path.is_dir() else path.stem
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


class _Hashing:
    """The slide's SHA-256, computed now or on a background thread; ``result()`` -> (hex, seconds)."""

    def __init__(self, path: Path, *, background: bool) -> None:
        self._path = path
        self._value: tuple[str, float] | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True) if background else None
        if self._thread is not None:
            self._thread.start()
        else:
            self._run()

    def _run(self) -> None:
        t0 = time.perf_counter()
        try:
            self._value = (slide_sha256(self._path), time.perf_counter() - t0)
        except BaseException as exc:  # re-raised in the caller's thread
            self._error = exc

    def result(self) -> tuple[str, float]:
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._value is not None
        return self._value


def store_path_for(slide: Path, out_dir: Path) -> Path:
    return Path(out_dir) / f"{slide_id_for(Path(slide))}.zarr"


# --- worker side ------------------------------------------------------------------------------
# Workers are threads: JPEG decoding, the OpenCV QC and the compression all release the GIL
# (2 threads decode 1.8-1.9x faster than one on 2 cores), and threads share one store, so
# nothing is pickled and no interpreter has to start. Each thread keeps its own reader and
# buffer (thread-local): an in-process run inside a dask worker tiling several slides on
# several threads never shares state between slides either.
_LOCAL = threading.local()


def _w() -> dict:
    return _LOCAL.__dict__


@dataclass(frozen=True)
class _UnitJob:
    """What every worker thread needs to turn a unit number into a written chunk + QC values."""

    slide: str
    backend: str
    geometry: TileGeometry
    grid_rc: np.ndarray
    mask_fraction: np.ndarray  # (N,) tissue-mask coverage of each tile: its tissue fraction
    mpp_um: float  # tile pixel size
    tissue: TissueParams
    qc: QcParams
    block_tiles: int
    writer: TileChunkWriter
    readers: list = field(default_factory=list)  # every thread's reader, closed by the coordinator


def _worker_init(job: _UnitJob) -> None:
    _w()["job"] = job
    _w()["reader"] = open_slide(job.slide, backend=job.backend)
    job.readers.append(_w()["reader"])
    _w()["buffer"] = np.empty(job.writer.chunk_shape, np.uint8)  # reused: no page faults per unit


def _close_readers(job: _UnitJob) -> None:
    while job.readers:
        job.readers.pop().close()


def _process_unit(unit: int) -> tuple[int, TileQc]:
    """Read, QC and write work unit ``unit``; returns its QC values for the coordinator to store."""
    job: _UnitJob = _w()["job"]
    chunk = job.writer.chunk_shape[0]
    start = unit * chunk
    stop = min(job.writer.n_tiles, start + chunk)
    grid = job.grid_rc[start:stop]
    bt = job.block_tiles
    blocks = (grid[:, 0] // bt) * 1_000_003 + grid[:, 1] // bt
    tiles = _w()["buffer"]
    try:
        for b in np.unique(blocks):
            sel = np.flatnonzero(blocks == b)
            if sel[-1] - sel[0] + 1 == sel.size:  # plans are block-major: a block is a run of tiles
                read_tiles(_w()["reader"], geometry=job.geometry, grid_rc=grid[sel], out=tiles[sel[0] : sel[-1] + 1])
            else:
                tiles[sel] = read_tiles(_w()["reader"], geometry=job.geometry, grid_rc=grid[sel])
    except Exception as exc:
        raise SlideOpenError(
            f"{job.slide}: cannot read pixels near tile {start} ({type(exc).__name__}: {exc}); "
            "the file may be truncated or corrupt: re-copy it"
        ) from exc
    n = stop - start
    tiles[n:] = 0  # the last unit's chunk is padded with the array's fill value
    qc = tile_qc(tiles[:n], tissue_fraction=job.mask_fraction[start:stop], mpp_um=job.mpp_um,
                 tissue_params=job.tissue, qc_params=job.qc)
    job.writer.write(unit, tiles)
    return unit, qc


# --- orchestration ------------------------------------------------------------------------------
def _fingerprint(slide_sha: str, slide_mpp: float, config: TileConfig, geometry: TileGeometry) -> str:
    relevant = {
        "slide_sha256": slide_sha,
        "slide_mpp_um": slide_mpp,
        "geometry": geometry.to_dict(),
        "chunk_tiles": config.chunk_tiles,
        "block_tiles": config.block_tiles,
        "codec": config.codec,
        "jpeg_quality": config.jpeg_quality if config.codec == "jpeg" else None,
        "thumb_mpp_um": config.thumb_mpp_um,
        "min_mask_fraction": config.min_mask_fraction,
        "tissue": config.tissue.to_dict(),
        "qc": config.qc.to_dict(),
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()


def _fit_chunks_to_codec(config: TileConfig) -> TileConfig:
    """A JPEG chunk is one image at most 65,500 px tall: large tiles get fewer tiles per chunk."""
    if config.codec != "jpeg" or config.chunk_tiles * config.tile_px <= JPEG_MAX_SIDE_PX:
        return config
    fitted = JPEG_MAX_SIDE_PX // config.tile_px
    if fitted < 1:
        raise ConfigError(f"--tile-px {config.tile_px} exceeds the JPEG size limit ({JPEG_MAX_SIDE_PX} px); use --codec zstd")
    log.info("%d px tiles: %d tiles per chunk (a JPEG chunk is at most %d px tall)", config.tile_px, fitted, JPEG_MAX_SIDE_PX)
    return replace(config, chunk_tiles=fitted)


def tile_slide(slide: str | Path, out_dir: str | Path, *, config: TileConfig | None = None) -> TileResult:
    """Tile ``slide`` into ``out_dir/<slide-id>.zarr`` (and ``<slide-id>.qc.png``); resume if interrupted."""
    config = config or TileConfig()
    config.validate()
    config = _fit_chunks_to_codec(config)
    t_start = time.perf_counter()
    slide = Path(slide)
    out_dir = prepare_output_dir(out_dir)
    store_path = store_path_for(slide, out_dir)
    check_store_slot(store_path, known_entries=STORE_ENTRIES)  # a user's file or directory is never touched
    with store_lock(store_path):  # one run per store: a second one exits with a clear line
        remove_tmp_files(store_path)  # chunks a killed run was writing (we hold the lock: nobody else is)
        done = _complete_store_to_skip(slide, store_path, config)
        if done is not None:
            qc_summary = done.attrs.get("qc", {}).get("summary", {})
            return TileResult(slide, store_path, "skipped", done.n_tiles, int(qc_summary.get("n_passed", 0)), 0.0)
        return _tile_into(slide, out_dir, store_path, config, t_start)


def settings_key(config: TileConfig) -> str:
    """Fingerprint of every setting that changes a store's content (recorded; a complete store must match it)."""
    relevant = {
        "target_mpp_um": config.target_mpp_um, "tile_px": config.tile_px, "stride_px": config.stride_px,
        "slide_mpp_um": config.slide_mpp_um, "mpp_csv": str(Path(config.mpp_csv).resolve()) if config.mpp_csv else None,
        "chunk_tiles": config.chunk_tiles, "block_tiles": config.block_tiles, "codec": config.codec,
        "jpeg_quality": config.jpeg_quality if config.codec == "jpeg" else None, "thumb_mpp_um": config.thumb_mpp_um,
        "min_mask_fraction": config.min_mask_fraction, "mpp_tolerance": config.mpp_tolerance,
        "tissue": config.tissue.to_dict(), "qc": config.qc.to_dict(),
    }
    if not config.sharp_chroma:  # only when not the default, so stores made before the option keep their key
        relevant["sharp_chroma"] = False
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()


def _complete_store_to_skip(slide: Path, store_path: Path, config: TileConfig) -> PatchStore | None:
    """The complete store to keep as it is; ``None`` to (re)tile; an error when it was made from another slide
    file or with other settings (never silently reused)."""
    if config.overwrite or not store_path.exists():
        return None
    try:
        done = PatchStore.open(store_path, require_complete=False)
    except StoreError:
        return None  # unreadable leftovers of our own: rebuilt
    meta = done.attrs
    if not meta.get("complete"):
        return None  # resumed (or restarted if the slide or settings changed)
    fix = "use --overwrite to redo it, or a different -o"
    if meta.get("settings_key") is None:
        raise StoreError(f"{store_path}: complete store from an older wsi-her2 (schema {meta.get('schema_version')}) "
                         f"whose settings are not recorded; {fix}")
    if meta["settings_key"] != settings_key(config):
        raise StoreError(f"{store_path}: complete store made with other tiling settings ({meta.get('command', '?')}); {fix}")
    recorded = meta.get("slide", {})
    same_file = (recorded.get("path"), recorded.get("size_bytes"), recorded.get("mtime_ns")) == (
        str(slide.resolve()), *slide_stat(slide))
    if not same_file and recorded.get("sha256") != slide_sha256(slide):
        raise StoreError(f"{store_path}: complete store made from another slide file ({recorded.get('path')}); {fix}")
    log.info("%s: complete store exists, skipping (use --overwrite to redo)", store_path)
    _warn_if_colour_unrecorded(store_path, meta)
    return done


def _warn_if_colour_unrecorded(store_path: Path, meta: dict) -> None:
    """A store tiled before the level choice weighed colour sharpness: its settings key is the same (the
    choice is no setting), so it is reused, but its level may be a 4:2:0 one and the scorer, finding no
    ``tiling.chroma_mpp_um``, takes its colour as sharp."""
    if "chroma_mpp_um" not in meta.get("tiling", {}):
        log.warning("%s: tiled by an older wsi-her2 that did not record the colour resolution of its tiles; "
                    "re-tile it with --overwrite so membranes on 4:2:0 JPEG levels are read at full intensity",
                    store_path)


def _tile_into(slide: Path, out_dir: Path, store_path: Path, config: TileConfig, t_start: float) -> TileResult:
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
            level_chroma=level_chroma_factors(slide, level_dims), prefer_sharp_chroma=config.sharp_chroma,
        )
        log.info(
            "%s: %s µm/px (%s) -> tiles of %d px at %.4f µm/px from level %d (resize x%.3f, colour at %.3g µm/px)",
            slide.name, mpp.mpp_um, mpp.source, geometry.tile_px, geometry.effective_mpp_um,
            geometry.level, 1 / geometry.level_px_per_target_px, geometry.chroma_mpp_um,
        )
        # The SHA-256 reads the whole file; with more than one worker it runs on a second thread
        # while this one reads the thumbnail (hashlib releases the GIL), else before it.
        hashing = _Hashing(slide, background=config.workers > 1)
        t0 = time.perf_counter()
        thumb, thumb_scale = read_thumbnail_or_fail(reader, slide, slide_mpp_um=mpp.mpp_um,
                                                    thumb_mpp_um=config.thumb_mpp_um)
        thumb_mpp = mpp.mpp_um / thumb_scale
        tissue = detect_tissue(thumb, thumb_mpp_um=thumb_mpp, params=config.tissue)
        coverage = mask_coverage(tissue.mask, geometry=geometry, thumb_px_per_level0_px=thumb_scale)
        plan = plan_tiles(coverage, geometry=geometry, min_mask_fraction=config.min_mask_fraction, block_tiles=config.block_tiles)
        t_plan = time.perf_counter() - t0
        if plan.n_tiles == 0:
            if config.qc_png:  # show what was looked at: the thumbnail with the (empty) tissue outline
                _save_qc_picture(out_dir, slide, thumb, tissue, plan, geometry, thumb_scale,
                                 flags=np.zeros(0, np.uint8), title="no tissue found")
            reason = (f"no tissue found (tissue area {tissue.tissue_area_mm2:.3f} mm², grid {geometry.grid_cols}x"
                      f"{geometry.grid_rows} tiles)")
            # an earlier store here (an --overwrite of a complete one, or an interrupted run) would
            # otherwise be scored in place of the record
            remove_store(store_path)
            write_no_tissue_record(store_path, slide=slide, reason=reason, tissue_area_mm2=tissue.tissue_area_mm2)
            raise NoTissueError(
                f"{slide}: {reason}; check the slide, or lower --min-od / raise --max-gray if the stain is very pale"
            )
        slide_sha, t_hash = hashing.result()
        fingerprint = _fingerprint(slide_sha, mpp.mpp_um, config, geometry)
        store = _open_or_create(
            store_path, config=config, fingerprint=fingerprint, plan=plan, geometry=geometry, thumb=thumb,
            tissue=tissue, thumb_scale=thumb_scale, slide=slide, slide_sha=slide_sha, mpp=mpp, reader=reader,
        )
    pending = [u for u, done in enumerate(store.units_done()) if not done]
    status = "resumed" if len(pending) < store.n_units else "tiled"
    t0 = time.perf_counter()
    _run_units(slide, store, pending, config=config, geometry=geometry)
    t_tiles = time.perf_counter() - t0

    flags = store.array("qc_flags")
    summary = slide_qc_summary(grid_rc=plan.grid_rc, flags=flags, pen_area_mm2=tissue.pen_area_mm2, qc_params=config.qc)
    if config.qc_png:
        _save_qc_picture(out_dir, slide, thumb, tissue, plan, geometry, thumb_scale, flags=flags,
                         title=f"{summary['n_passed']}/{plan.n_tiles} tiles kept")
    meta = store.attrs
    meta["qc"]["summary"] = summary
    meta["timings_s"] = {
        "hash": round(t_hash, 3), "thumbnail_and_plan": round(t_plan, 3), "tiles": round(t_tiles, 3),
        "total": round(time.perf_counter() - t_start, 3),
    }
    meta["complete"] = True  # last write: only now does the store count as done
    store.update_attrs(**meta)
    clear_no_tissue_record(store_path)  # tiled after all (e.g. with a lower --min-od)
    return TileResult(slide, store_path, status, plan.n_tiles, summary["n_passed"], time.perf_counter() - t_start)


def _save_qc_picture(out_dir: Path, slide: Path, thumb, tissue, plan, geometry, thumb_scale: float, *,
                     flags, title: str) -> None:
    """``<id>.qc.png``: the thumbnail, tissue outline, pen ink and tiles coloured by QC outcome."""
    picture = render_qc_picture(
        thumb, tissue_mask=tissue.mask, pen_mask=tissue.pen, coords_level0=plan.coords_level0,
        tile_size_level0=geometry.tile_size_level0, thumb_px_per_level0_px=thumb_scale, qc_flags=flags,
        title=f"{slide_id_for(slide)}: {title}",
    )
    save_qc_picture(picture, out_dir / f"{slide_id_for(slide)}.qc.png")


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
    size_bytes, mtime_ns = slide_stat(slide)
    attrs = {
        "package": "wsi-her2",
        "package_version": __version__,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        "plan_fingerprint": fingerprint,
        "settings_key": settings_key(config),
        "slide": {
            "id": slide_id_for(slide),
            "path": str(Path(slide).resolve()),
            "sha256": slide_sha,
            "size_bytes": size_bytes,  # a DICOM slide: all its files (total bytes, newest time)
            "mtime_ns": mtime_ns,
            **_dicom_record(reader),
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
            "glass_measured": bool(tissue.glass.n_pixels > 0),  # False: no glass in view, glass_rgb is a guess
            "od_threshold": round(tissue.glass.od_threshold, 4), "texture_threshold": round(tissue.glass.texture_threshold, 3),
            "tissue_area_mm2": round(tissue.tissue_area_mm2, 4), "tissue_fraction_of_slide": round(tissue.tissue_fraction, 4),
        },
        "qc": {"params": config.qc.to_dict(), "flags": dict(QC_FLAGS)},
    }
    return PatchStore.create(
        store_path, n_tiles=plan.n_tiles, tile_px=geometry.tile_px, chunk_tiles=config.chunk_tiles, codec=config.codec,
        jpeg_quality=config.jpeg_quality,
        attrs=attrs,
        per_tile={"coords_level0": plan.coords_level0, "grid_rc": plan.grid_rc, "mask_fraction": plan.mask_fraction},
        images={"thumbnail": thumb, "tissue_mask": tissue.mask, "pen_mask": tissue.pen},
    )


def _dicom_record(reader) -> dict:
    """A DICOM slide's series, files and where its id came from (recorded in the store)."""
    dicom = getattr(reader, "dicom", None)
    if dicom is None:
        return {}
    return {"dicom": {"series_uid": dicom.series_uid, "id_source": dicom.id_source, "n_files": len(dicom.files),
                      "files": [p.name for p in dicom.files]}}


def _process_run(units: list[int]) -> list[tuple[int, TileQc]]:
    return [_process_unit(u) for u in units]


MAX_RUN_UNITS = 16


class _QcLedger:
    """Every unit's QC values and done flag, held by the coordinating thread, flushed in bulk.

    Flushed every ``QC_FLUSH_S`` seconds and when the run ends or fails: an interrupted run
    loses at most that much finished work, and a unit is marked done only after its tiles
    (written by its worker before it reported) and its QC values are on disk.
    """

    def __init__(self, store: PatchStore) -> None:
        self.store = store
        self.chunk = store.chunk_tiles
        self.arrays = {name: store.array(name) for name in QC_ARRAYS}  # resumed units keep theirs
        self.done = store.units_done()
        self._dirty = False
        self._last = time.monotonic()

    def add(self, unit: int, qc: TileQc) -> None:
        start = unit * self.chunk
        for name, values in qc.arrays().items():
            self.arrays[name][start : start + len(values)] = values
        self.done[unit] = True
        self._dirty = True
        if time.monotonic() - self._last > QC_FLUSH_S:
            self.flush()

    def flush(self) -> None:
        if self._dirty:
            self.store.write_qc(self.arrays, self.done)
            self._dirty = False
        self._last = time.monotonic()


QC_FLUSH_S = 2.0


def _run_units(slide: Path, store: PatchStore, pending: list[int], *, config: TileConfig, geometry: TileGeometry) -> None:
    if not pending:
        return
    job = _UnitJob(
        slide=str(slide), backend=config.backend, geometry=geometry, grid_rc=store.grid_rc,
        mask_fraction=store.array("mask_fraction"), mpp_um=geometry.effective_mpp_um,
        tissue=config.tissue, qc=config.qc, block_tiles=config.block_tiles,
        writer=store.chunk_writer(),
    )
    ledger = _QcLedger(store)
    bar = _progress(total=len(pending), enabled=config.progress, desc=slide_id_for(slide))
    workers = min(config.workers, len(pending))
    try:
        if workers <= 1:
            _worker_init(job)
            try:
                for unit in pending:
                    ledger.add(*_process_unit(unit))
                    bar.update(1)
            finally:
                _w().clear()
            return
        # Runs of consecutive units per task: neighbouring units share native slide tiles, which
        # a thread's reader then decodes once; a few runs per thread keep the threads balanced.
        run = max(1, min(MAX_RUN_UNITS, -(-len(pending) // (4 * workers))))
        runs = [pending[i : i + run] for i in range(0, len(pending), run)]
        with ThreadPoolExecutor(max_workers=workers, initializer=_worker_init, initargs=(job,),
                                thread_name_prefix="wsi-her2-tile") as pool:
            futures = [pool.submit(_process_run, r) for r in runs]
            try:
                for fut in _as_completed_fail_fast(futures):
                    results = fut.result()
                    for unit, qc in results:
                        ledger.add(unit, qc)
                    bar.update(len(results))
            except BaseException:  # Ctrl-C or a failed unit: run no more units, keep the finished ones
                for fut in futures:
                    fut.cancel()
                raise
    finally:
        _close_readers(job)  # after the pool has shut down: no thread reads any more
        ledger.flush()
        bar.close()


def _as_completed_fail_fast(futures):
    """Yield futures as they finish; on the first failure cancel the rest and raise it."""
    for fut in as_completed(futures):
        if fut.exception() is not None:
            for other in futures:
                other.cancel()
            raise fut.exception()
        yield fut


def _progress(*, total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="chunk", leave=False, file=sys.stderr)


def default_workers() -> int:
    return min(available_cpus(), 8)
