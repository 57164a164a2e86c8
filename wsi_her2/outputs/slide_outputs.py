"""A scored store's pictures and QuPath file: ``<id>.geojson``, ``<id>.heatmap.png`` and the
``--heatmap MEASURE`` maps, drawn from the store's geometry and thumbnail."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from wsi_her2.errors import ConfigError
from wsi_her2.store.patch_store import PatchStore


def write_slide_geojson(out: Path, sid: str, store: PatchStore, calls, classes, reasons, measurements, slide_call, *, gz: bool,
                   extra_features: list[dict] = (), slide_name_suffix: str = "") -> Path:
    from wsi_her2.outputs.geojson import build_feature_collection, slide_feature, tile_features, write_geojson

    bounds = tuple(store.attrs["slide"].get("bounds_offset_px", (0, 0)))
    namespace = store.attrs["slide"]["sha256"]
    tiles = tile_features(
        coords_level0=store.coords_level0, tile_size_level0=store.tile_size_level0, class_names=classes, calls=calls,
        measurements=measurements, reject_reasons=reasons, bounds_offset_px=bounds, id_namespace=namespace,
    )
    coords = store.coords_level0
    size = store.tile_size_level0
    bbox = (float(coords[:, 0].min()), float(coords[:, 1].min()), float(coords[:, 0].max() + size), float(coords[:, 1].max() + size))
    slide = slide_feature(slide_call=slide_call, bbox=bbox, bounds_offset_px=bounds, id_namespace=namespace)
    slide["properties"]["name"] += slide_name_suffix
    fc = build_feature_collection(list(extra_features) + tiles, slide)
    name = f"{sid}.geojson.gz" if gz else f"{sid}.geojson"
    return write_geojson(fc, out / name, gzip=gz)


def write_slide_heatmap(path: Path, store: PatchStore, calls, classes, slide_call) -> Path:
    from wsi_her2.outputs.heatmap import write_call_heatmap

    return write_call_heatmap(
        path, thumbnail=store.array("thumbnail"), thumb_px_per_level0_px=float(store.attrs["thumbnail"]["px_per_level0_px"]),
        coords_level0=store.coords_level0, tile_size_level0=store.tile_size_level0, calls=calls, class_names=classes,
        slide_call=slide_call, slide_id=store.slide_id,
    )


def write_measure_heatmaps(out: Path, store: PatchStore, measures: list[str], measurements: dict, slide_call) -> dict[str, str]:
    """``--heatmap MEASURE``: one continuous map per named tile measurement, ``<id>.heatmap.<measure>.png``."""
    from wsi_her2.outputs.heatmap import write_measure_heatmap

    unknown = [m for m in measures if m not in measurements]
    if unknown:
        raise ConfigError(f"--heatmap {', '.join(unknown)}: no such tile measurement; choose from {', '.join(sorted(measurements))}")
    written = {}
    for m in measures:
        path = write_measure_heatmap(
            out / f"{store.slide_id}.heatmap.{m}.png", thumbnail=store.array("thumbnail"),
            thumb_px_per_level0_px=float(store.attrs["thumbnail"]["px_per_level0_px"]), coords_level0=store.coords_level0,
            tile_size_level0=store.tile_size_level0, values=np.where(store.qc_pass, measurements[m], np.nan),
            measure=m, slide_call=slide_call, slide_id=store.slide_id,
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
