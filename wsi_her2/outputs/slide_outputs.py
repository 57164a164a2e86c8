"""Every file of a scored slide, written from its :class:`~wsi_her2.result.SlideResult` and its store.

:func:`write_slide_files` writes, in this order: the parts' table (``cores.csv`` / ``regions.csv``,
upserted) and the TMA picture; the saliency picture and the cells (when asked for); side by side
the tiles parquet, ``<id>.geojson`` and the heatmaps (the store's geometry and thumbnail); the
report (``<id>.report.html`` / ``.pdf``). Then :func:`write_result_files` writes ``<id>.json``
(with the SHA-256 of each of those files) and the slide's ``slides.csv`` row: ``<id>.json``'s
presence means the slide is scored, and a kill before its row is written is repaired by the next
run. A slide where ``tile`` found no tissue has only these two and its report (saying why there is
no call, with the tile stage's QC picture), written by the score stage without this function.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from wsi_her2.errors import ConfigError
from wsi_her2.result import Groups, PartCall, SlideResult, TileResults
from wsi_her2.store.patch_store import PatchStore


@dataclass(frozen=True)
class OutputOptions:
    """What to write besides the standard files: ``.geojson.gz``, continuous maps of these tile
    measurements (``--heatmap``), the report (off with ``--no-report``)."""

    geojson_gz: bool = False
    heatmap_measures: tuple[str, ...] = ()
    report: bool = True


def write_slide_files(out: Path, store: PatchStore, result: SlideResult, options: OutputOptions) -> SlideResult:
    """Write every file of ``result`` (a fresh result, with its per-tile results) into ``out`` but ``<id>.json``
    and the ``slides.csv`` row (:func:`write_result_files`); the result with their paths (``outputs``)."""
    from wsi_her2.outputs.cells import write_slide_cells
    from wsi_her2.outputs.saliency import slide_saliency_png

    tiles, sid = result.tiles, result.slide_id
    group_outputs = {} if result.groups is None else write_group_files(out, store, result.groups, tiles)
    extra: dict[str, str] = {}
    if tiles.saliency is not None:
        extra["saliency_png"] = str(slide_saliency_png(store, tiles.saliency, out / f"{sid}.saliency.png"))
    if tiles.cells is not None:
        extra.update(write_slide_cells(out, store, tiles.cells))
    result = result.with_outputs({**_write_tile_files(out, store, result, options), **group_outputs, **extra})
    if options.report:  # from the result, before <id>.json (whose presence means done)
        from wsi_her2.outputs.report import write_slide_report

        reports = write_slide_report(out, result, qc_png=store.path.parent / f"{sid}.qc.png")
        result = result.with_outputs({**result.outputs, **reports})
    return result


def write_result_files(out: Path, result: SlideResult) -> SlideResult:
    """``<id>.json`` (with the SHA-256 of each file the result names and its own) and the ``slides.csv`` row."""
    from wsi_her2.outputs.manifest import write_result_json
    from wsi_her2.outputs.tables import upsert_slides_csv

    write_result_json(out / f"{result.slide_id}.json", result.to_record())
    upsert_slides_csv(out / "slides.csv", [result.row])
    return result


def write_group_files(out: Path, store: PatchStore, groups: Groups, tiles: TileResults) -> dict[str, str]:
    """The parts' table (``cores.csv`` / ``regions.csv``, this slide's rows replaced) and, for a TMA, its picture."""
    from wsi_her2.outputs.tables import upsert_part_rows

    written = {f"{groups.key}_csv": str(upsert_part_rows(out / f"{groups.key}.csv", store.slide_id, groups))}
    if groups.kind == "core":
        from wsi_her2.outputs.tma_picture import write_tma_picture

        written["tma_png"] = str(write_tma_picture(out / f"{store.slide_id}.tma.png", store, groups, tiles))
    return written


def _write_tile_files(out: Path, store: PatchStore, result: SlideResult, options: OutputOptions) -> dict[str, str]:
    """The tiles parquet, GeoJSON and heatmaps, written side by side; their paths by output name."""
    from wsi_her2.outputs.tables import write_tiles_parquet

    sid, tiles, call = result.slide_id, result.tiles, result.call
    written = run_side_by_side({
        "tiles_parquet": lambda: str(write_tiles_parquet(out / f"{sid}.tiles.parquet", store, tiles)),
        "geojson": lambda: str(write_slide_geojson(out / f"{sid}.geojson", store, tiles, call, result.groups,
                                                   gz=options.geojson_gz)),
        "heatmap_png": lambda: str(write_slide_heatmap(out / f"{sid}.heatmap.png", store, tiles, call)),
        "measure_heatmaps": lambda: write_measure_heatmaps(out, store, list(options.heatmap_measures), tiles, call),
    })
    measure_maps = written.pop("measure_heatmaps")
    return {**written, **measure_maps}


def write_slide_geojson(path: Path, store: PatchStore, tiles: TileResults, call: PartCall, groups: Groups | None = None, *,
                        gz: bool = False) -> Path:
    """``<id>.geojson`` (``.gz`` with ``gz``): the slide annotation carrying the call, one annotation per
    called TMA core or region, then every tile."""
    from wsi_her2.outputs.geojson import build_feature_collection, part_features, slide_feature, tile_features, write_geojson

    bounds = tuple(store.attrs["slide"].get("bounds_offset_px", (0, 0)))
    namespace = store.attrs["slide"]["sha256"]
    tile_objects = tile_features(
        coords_level0=store.coords_level0, tile_size_level0=store.tile_size_level0, class_names=list(tiles.classes),
        calls=tiles.calls, measurements=tiles.measurements, reject_reasons=tiles.reasons, bounds_offset_px=bounds,
        id_namespace=namespace,
    )
    coords = store.coords_level0
    size = store.tile_size_level0
    bbox = (float(coords[:, 0].min()), float(coords[:, 1].min()), float(coords[:, 0].max() + size), float(coords[:, 1].max() + size))
    slide = slide_feature(slide_call=call.to_dict(), bbox=bbox, bounds_offset_px=bounds, id_namespace=namespace)
    parts: list[dict] = []
    if groups is not None:
        slide["properties"]["name"] += _groups_note(groups)
        parts = part_features(groups, bounds_offset_px=bounds, id_namespace=namespace)
    return write_geojson(build_feature_collection(parts + tile_objects, slide), path, gzip=gz)


def _groups_note(groups: Groups) -> str:
    """What the slide annotation's name adds about the parts its call is over."""
    if groups.kind == "core":
        called = sum(p.called for p in groups.parts)
        return f"; TMA: {called} cores called, {len(groups.parts) - called} not (cores.csv)"
    return f" over {len(groups.parts)} region(s): {', '.join(p.name for p in groups.parts)}"


def write_slide_heatmap(path: Path, store: PatchStore, tiles: TileResults, call: PartCall) -> Path:
    """``<id>.heatmap.png``: the tile calls over the thumbnail, titled with the slide call."""
    from wsi_her2.outputs.heatmap import write_call_heatmap

    return write_call_heatmap(
        path, thumbnail=store.array("thumbnail"), thumb_px_per_level0_px=float(store.attrs["thumbnail"]["px_per_level0_px"]),
        coords_level0=store.coords_level0, tile_size_level0=store.tile_size_level0, calls=tiles.calls,
        class_names=list(tiles.classes), slide_call=call.to_dict(), slide_id=store.slide_id,
    )


def write_measure_heatmaps(out: Path, store: PatchStore, measures: list[str], tiles: TileResults,
                           call: PartCall) -> dict[str, str]:
    """``--heatmap MEASURE``: one continuous map per named tile measurement, ``<id>.heatmap.<measure>.png``."""
    from wsi_her2.outputs.heatmap import write_measure_heatmap

    measurements = tiles.measurements
    unknown = [m for m in measures if m not in measurements]
    if unknown:
        raise ConfigError(f"--heatmap {', '.join(unknown)}: no such tile measurement; choose from {', '.join(sorted(measurements))}")
    written = {}
    for m in measures:
        path = write_measure_heatmap(
            out / f"{store.slide_id}.heatmap.{m}.png", thumbnail=store.array("thumbnail"),
            thumb_px_per_level0_px=float(store.attrs["thumbnail"]["px_per_level0_px"]), coords_level0=store.coords_level0,
            tile_size_level0=store.tile_size_level0, values=np.where(store.qc_pass, measurements[m], np.nan),
            measure=m, slide_call=call.to_dict(), slide_id=store.slide_id,
        )
        written[f"heatmap_{m}_png"] = str(path)
    return written


def run_side_by_side(writers: Mapping[str, Callable[[], Any]]) -> dict[str, Any]:
    """Run independent output writers at once, one thread each; their results by name, in order.

    They overlap where they wait or leave the GIL: PNG, parquet and gzip encoding and file
    writes release it, the GeoJSON text does not. If writers fail, the first one's error (in
    ``writers`` order) is raised once all have ended, so no half-written file is left behind by
    a writer still running.
    """
    with ThreadPoolExecutor(max_workers=max(1, len(writers)), thread_name_prefix="wsi-her2-outputs") as pool:
        futures = {name: pool.submit(write) for name, write in writers.items()}
    return {name: future.result() for name, future in futures.items()}
