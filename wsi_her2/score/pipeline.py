"""Score one patch store: model -> tile probabilities -> slide call -> QuPath / tables / heatmap.

Reads only the store (never the slide), so scoring runs wherever the stores are. Outputs, next
to the store unless ``out_dir`` is given::

    <slide-id>.geojson       QuPath tiles (classified, measurable) + a slide annotation with the call
    <slide-id>.tiles.parquet one row per tile: coordinates, QC, class probabilities, call, measurements
    <slide-id>.json          the slide call, how it was reached, model config, versions, timings
    <slide-id>.heatmap.png   tile calls over the thumbnail
    slides.csv               one row per slide (upserted, sorted by slide id)

``<slide-id>.json`` is written last, so its presence means the slide is scored.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wsi_her2 import __version__
from wsi_her2.criteria import DEFAULT_CRITERIA, ScoringRule, scoring_rule
from wsi_her2.score.part_call import call_tiles
from wsi_her2.vocab import HER2_CLASSES, INDETERMINATE
from wsi_her2.errors import ConfigError, StoreError
from wsi_her2.files import clean_stale_tmp, prepare_output_dir
from wsi_her2.outputs.manifest import check_result, read_result, write_result_json
from wsi_her2.outputs.slide_outputs import (
    run_side_by_side,
    write_measure_heatmaps,
    write_slide_geojson,
    write_slide_heatmap,
)
from wsi_her2.outputs.tables import SLIDES_CSV_COLUMNS, ensure_slides_csv_row, upsert_slides_csv, write_tiles_parquet  # noqa: F401 (SLIDES_CSV_COLUMNS re-exported)
from wsi_her2.tile.qc import reject_reason
from wsi_her2.score.calibration import Calibration, load_calibration
from wsi_her2.score.scorer import DEFAULT_MODEL, load_scoring_model, prepare_scorer, scorer_capabilities
from wsi_her2.store.no_tissue import SUFFIX as NO_TISSUE_SUFFIX
from wsi_her2.store.no_tissue import read_record as read_no_tissue_record
from wsi_her2.store.no_tissue import store_path_of as no_tissue_store_path
from wsi_her2.store.patch_store import PatchStore, open_store
from wsi_her2.store.verify import verify_store

log = logging.getLogger(__name__)

@dataclass
class ScoreConfig:
    model: str = DEFAULT_MODEL  # registry name or a path to a trained .safetensors
    weights: str | None = None
    agg: str = "asco"
    batch_size: int = 64
    device: str = "auto"
    tta: bool = False
    compile: bool = False
    loader_workers: int | None = None  # threads decoding for the batch loop (None: 2 on CPU, up to 8 on CUDA)
    cpu_workers: int | None = 1  # --workers: processes scoring ihc_dab on CPU (1: in this process; None: one per CPU)
    min_tiles: int = 10
    geojson_gz: bool = False
    overwrite: bool = False
    progress: bool = False
    explain: str | None = None  # "gradcam" | "gradcam++": also write <id>.saliency.png and a saliency measurement
    force: bool = False  # score even when the stain check says the slide is not DAB IHC
    calibration: str | None = None  # --calibration: a wsi-her2 calibrate JSON (ihc_dab cut-points)
    heatmap_measures: list[str] = field(default_factory=list)  # --heatmap: continuous maps of these tile measurements
    roi: str | None = None  # --roi: QuPath GeoJSON of regions; only tiles mostly inside are scored, one call per region
    roi_class: str | None = None  # --roi-class: only regions of this QuPath class
    tma: bool = False  # --tma: find the cores of a tissue microarray, one call per core
    criteria: str = DEFAULT_CRITERIA  # --criteria: the tumour's own guideline (wsi_her2.criteria.CRITERIA)
    specimen: str | None = None  # --specimen resection|biopsy (None: biopsy for TMA cores, else resection)
    cells: bool = False  # --cells: every scored cell as a QuPath detection and a parquet row
    no_report: bool = False  # --no-report: no <id>.report.html / <id>.report.pdf


@dataclass
class SlideScore:
    slide_id: str
    call: dict
    row: dict
    outputs: dict[str, str] = field(default_factory=dict)
    skipped: bool = False


def result_json_path(store_path: Path, out_dir: Path | None = None) -> Path:
    store_path = Path(store_path)
    return Path(out_dir or store_path.parent) / f"{store_path.name.removesuffix('.zarr')}.json"


def score_store(store_path: str | Path, *, out_dir: str | Path | None = None, config: ScoreConfig | None = None, model=None,
                chunk_pool=None) -> SlideScore:
    """Score one complete patch store and write every per-slide output (``<id>.json`` last).

    ``chunk_pool``: a :class:`~wsi_her2.score.cpu_pool.ChunkPool` kept across the stores of a
    command (``cpu_workers`` > 1 then starts its worker processes once)."""
    config = config or ScoreConfig()
    calibration = validate_score_config(config)
    rule = scoring_rule_of(config)
    t_start = time.perf_counter()
    if not Path(store_path).exists() and (record := read_no_tissue_record(store_path)) is not None:
        return _score_no_tissue(Path(store_path), record, out_dir=out_dir, config=config)  # `tile` found no tissue
    store = open_store(store_path)
    out = prepare_output_dir(Path(out_dir) if out_dir else store.path.parent)
    clean_stale_tmp(out)  # temporary files of a killed run
    json_path = out / f"{store.slide_id}.json"
    done = None if config.overwrite else _already_scored(json_path, config, calibration)
    if done is not None:
        return done
    verify_store(store.path)  # a missing or damaged chunk is refused, never scored as black tiles
    model = _model_for(store, config, calibration, rule, model)
    groups = _tile_groups(store, config)  # regions (--roi) or TMA cores (--tma); None: the whole slide
    pred, inference = _predict(store, model, config, groups, chunk_pool)
    classes = list(model.wsi_her2_config.classes)
    calls = np.full(store.n_tiles, -1, dtype=np.int64)
    if pred.scored.any():
        calls[pred.scored] = np.argmax(pred.probs[pred.scored], axis=1)
    cut = calibration["cell_fraction_cut"] if calibration else None
    cell_xy_um = None if pred.cells is None else cell_positions_level0(store, pred.cells) * float(store.attrs["slide"]["mpp_um"])

    def call_part(use: np.ndarray) -> dict:  # one rule for the slide, each TMA core and each region
        return call_tiles(pred, use, agg=config.agg, min_tiles=config.min_tiles, rule=rule, cell_fraction_cut=cut,
                          cell_xy_um=cell_xy_um)

    slide_call = call_part(pred.scored)
    reasons = [reject_reason(int(f)) for f in store.qc_flags]
    group_part: dict[str, Any] = {"rows": [], "features": [], "outputs": {}, "slide_name": ""}
    if groups is not None:
        from wsi_her2.score.tile_groups import score_groups

        reasons = [r if inside or r else f"outside {groups.kind}s" for r, inside in zip(reasons, groups.inside)]
        group_part = score_groups(out, store, groups, pred=pred, calls=calls, classes=classes, call_part=call_part,
                                  min_tiles=config.min_tiles)
    measurements = _tile_measurements(store, pred, classes)
    extra_outputs = _explain(out, store, model, pred.scored, measurements, config) if config.explain else {}
    if config.cells and pred.cells is not None:
        extra_outputs.update(write_slide_cells(out, store, pred.cells))
    outputs = {**_write_slide_files(out, store, calls, classes, reasons, measurements, slide_call, config, group_part),
               **group_part["outputs"], **extra_outputs}
    tumour = tumour_summary(pred.measurements, pred.scored)
    row = _slides_csv_row(store.slide_id, config, slide_call, tumour, n_used=int(pred.scored.sum()),
                          n_rejected=int(store.n_tiles - pred.scored.sum()))
    result = _result_record(store, config, model, slide_call=slide_call, tumour=tumour, calibration=calibration,
                            row=row, inference=inference, outputs=outputs, t_start=t_start)
    if groups is not None:
        result[f"{groups.kind}s"] = group_part["rows"]
    if not config.no_report:  # <id>.report.html and .pdf, from the result (before <id>.json: its presence means done)
        from wsi_her2.outputs.report import write_slide_report
        outputs.update(write_slide_report(out, result, reasons=reasons, qc_png=store.path.parent / f"{store.slide_id}.qc.png"))
    write_result_json(json_path, result)  # with its outputs' SHA-256 and its own
    upsert_slides_csv(out / "slides.csv", [row])
    return SlideScore(store.slide_id, slide_call, row, outputs)


def _predict(store: PatchStore, model, config: ScoreConfig, groups, chunk_pool) -> tuple[Any, dict]:
    """The model over the store's QC-passed tiles (those in a part when there are parts); the inference record."""
    from wsi_her2.score.inference import InferenceConfig, predict_store

    inf_cfg = InferenceConfig(
        batch_size=config.batch_size, device=config.device, tta=config.tta, compile=config.compile,
        loader_workers=config.loader_workers, cpu_workers=config.cpu_workers,
    )
    t0 = time.perf_counter()
    pred = predict_store(store, model, config=inf_cfg, progress=config.progress, chunk_pool=chunk_pool,
                         indices=None if groups is None else store.qc_pass & groups.inside)
    return pred, {**asdict(inf_cfg), "device_used": pred.device, "tiles_per_s": round(pred.tiles_per_s, 1),
                  "seconds": round(time.perf_counter() - t0, 3)}


def _result_record(store: PatchStore, config: ScoreConfig, model, *, slide_call: dict, tumour: dict, calibration,
                   row: dict, inference: dict, outputs: dict, t_start: float) -> dict:
    """What ``<id>.json`` records of a scored slide."""
    return {
        "slide": store.slide_id,
        "store": str(store.path),
        "slide_sha256": store.attrs["slide"]["sha256"],
        "call": slide_call,
        "criteria": slide_call["criteria"],
        "tumour": tumour,
        "calibration": calibration,
        "row": row,
        "aggregation": config.agg,
        "model": {"name": _model_label(config), "config": model.wsi_her2_config.to_dict(), "weights": config.weights},
        "inference": inference,
        "qc_summary": store.attrs.get("qc", {}).get("summary", {}),
        "tile_mpp_um": store.attrs["tiling"]["effective_mpp_um"],
        "tile_px": store.tile_px,
        "package_version": __version__,
        "timings_s": {"inference": inference["seconds"], "total": round(time.perf_counter() - t_start, 3)},
        "outputs": outputs,
        "parts": _parts_key(config),
    }


def cell_positions_level0(store: PatchStore, cells) -> np.ndarray:
    """``(cells, 2)`` x, y of each scored cell in level-0 pixels of the slide file."""
    return cells.level0_xy(store.coords_level0, store.tile_size_level0 / store.tile_px)


def write_slide_cells(out: Path, store: PatchStore, cells) -> dict[str, str]:
    """``--cells``: every scored cell as a QuPath detection (``<id>.cells.geojson.gz``) and a table row."""
    from wsi_her2.outputs.cells import CELL_RADIUS_UM, write_cells_geojson, write_cells_parquet

    xy = cell_positions_level0(store, cells)
    offset = np.asarray(store.attrs["slide"].get("bounds_offset_px", (0, 0)), np.float64)  # QuPath's view of the slide
    radius_px = CELL_RADIUS_UM / float(store.attrs["slide"]["mpp_um"])
    sid = store.slide_id
    return {"cells_geojson": str(write_cells_geojson(out / f"{sid}.cells.geojson.gz", cells, xy - offset, radius_px=radius_px)),
            "cells_parquet": str(write_cells_parquet(out / f"{sid}.cells.parquet", cells, xy))}


def _score_no_tissue(store_path: Path, record: dict, *, out_dir: str | Path | None, config: ScoreConfig) -> SlideScore:
    """``<id>.json`` and the ``slides.csv`` row of a slide where ``tile`` found no tissue."""
    from wsi_her2.score.aggregate import HER2_CATEGORIES, her2_category

    sid = store_path.name.removesuffix(".zarr")
    out = prepare_output_dir(Path(out_dir) if out_dir else store_path.parent)
    category = her2_category(INDETERMINATE, None)
    call = {"her2_score": INDETERMINATE, "confidence": 0.0, "class_fractions": dict.fromkeys(HER2_CLASSES, 0.0),
            "n_tiles_used": 0, "method": config.agg, "details": {"reason": record["reason"]},
            "her2_category": category, "her2_category_text": HER2_CATEGORIES[category],
            "criteria": scoring_rule_of(config).to_dict()}
    row = _slides_csv_row(sid, config, call, {}, n_used=0, n_rejected=0)
    result = {"slide": sid, "store": None, "slide_path": record.get("slide"), "call": call, "row": row,
              "aggregation": config.agg, "model": {"name": _model_label(config)}, "package_version": __version__,
              "no_tissue": record, "outputs": {}}
    write_result_json(out / f"{sid}.json", result)
    upsert_slides_csv(out / "slides.csv", [row])
    return SlideScore(sid, call, row, {})


def _already_scored(json_path: Path, config: ScoreConfig, calibration: dict | None) -> SlideScore | None:
    """The earlier result when this slide was scored with the same model, rule, parts and calibration,
    and its outputs are still what ``<id>.json`` recorded (else it is scored again, saying why)."""
    if not json_path.exists():
        return None
    sid = json_path.name.removesuffix(".json")
    done, unreadable = read_result(json_path)
    if done is not None and (done.get("model", {}).get("name") != _model_label(config) or done.get("aggregation") != config.agg
                             or done.get("parts") != _parts_key(config) or done.get("calibration") != calibration):
        return None
    problems = [unreadable] if done is None else check_result(json_path, done, tables=("regions.csv", "cores.csv"))
    if problems:
        log.warning("%s: earlier outputs missing or damaged (%s); scoring it again", sid, "; ".join(problems))
        return None
    log.info("%s: already scored (use --overwrite to redo)", sid)
    ensure_slides_csv_row(json_path.parent / "slides.csv", done["row"])  # a kill between <id>.json and slides.csv
    return SlideScore(sid, done["call"], done["row"], done.get("outputs", {}), skipped=True)


def _write_slide_files(out: Path, store: PatchStore, calls, classes, reasons, measurements, slide_call, config: ScoreConfig,
                       group_part: dict) -> dict[str, str]:
    """The slide's tiles parquet, GeoJSON and heatmaps, written side by side; their paths by output name."""
    sid = store.slide_id
    written = run_side_by_side({
        "tiles_parquet": lambda: str(write_tiles_parquet(out / f"{sid}.tiles.parquet", store, calls, classes, reasons, measurements)),
        "geojson": lambda: str(write_slide_geojson(out, sid, store, calls, classes, reasons, measurements, slide_call,
                                                   gz=config.geojson_gz, extra_features=group_part["features"],
                                                   slide_name_suffix=group_part["slide_name"])),
        "heatmap_png": lambda: str(write_slide_heatmap(out / f"{sid}.heatmap.png", store, calls, classes, slide_call)),
        "measure_heatmaps": lambda: write_measure_heatmaps(out, store, config.heatmap_measures, measurements, slide_call),
    })
    measure_maps = written.pop("measure_heatmaps")
    return {**written, **measure_maps}


def _model_for(store: PatchStore, config: ScoreConfig, calibration: dict | None, rule: ScoringRule, model=None):
    """The model to score ``store`` with, set up for the slide, after the checks that it fits the store's tiles."""
    if model is None:
        model = load_scoring_model(config.model, weights=config.weights, store_tile_px=store.tile_px,
                                   store_mpp_um=float(store.attrs["tiling"]["effective_mpp_um"]))
    lab = None if calibration is None else Calibration(calibration["dab_gain"], calibration["cell_fraction_cut"])
    return prepare_scorer(store, model, criteria=rule.criteria, calibration=lab, force=config.force)


def _tile_measurements(store: PatchStore, pred, classes: list[str]) -> dict[str, np.ndarray]:
    """Every per-tile number the outputs carry: class probabilities, the stored QC, the scorer's own."""
    qc = {name: store.array(name) for name in ("tissue_fraction", "laplacian_var", "sharpness", "pen_fraction")
          if store.has_array(name)}
    probs_named = {f"p_{c}": pred.probs[:, i] for i, c in enumerate(classes)}
    # A scorer measurement named like a QC value (ihc_dab's own OD-based "tissue_fraction") is kept
    # as "scorer_<name>": the QC value, the one that decided the tile's fate, keeps its name.
    scorer = {(f"scorer_{k}" if k in qc else k): v for k, v in pred.measurements.items()}
    return {**probs_named, **qc, **scorer}


def _explain(out: Path, store: PatchStore, model, scored, measurements: dict, config: ScoreConfig) -> dict[str, str]:
    """Grad-CAM(++) picture and a per-tile ``saliency_mean`` measurement (added to ``measurements``)."""
    from wsi_her2.outputs.saliency import slide_saliency_png, tile_saliency

    idx = np.nonzero(scored)[0]
    maps = tile_saliency(store, model, indices=idx, method=config.explain, device=config.device)
    saliency = np.full(store.n_tiles, np.nan, np.float32)
    saliency[idx] = maps.reshape(len(idx), -1).mean(axis=1)
    measurements["saliency_mean"] = saliency
    png = out / f"{store.slide_id}.saliency.png"
    slide_saliency_png(store, maps, idx, png)
    return {"saliency_png": str(png)}


def _slides_csv_row(slide_id: str, config: ScoreConfig, slide_call: dict, tumour: dict, *, n_used: int,
                    n_rejected: int) -> dict:
    fractions = slide_call.get("class_fractions", {})
    return {
        "slide": slide_id,
        "her2_score": slide_call["her2_score"],
        "confidence": round(float(slide_call["confidence"]), 4),
        **{f"frac_{c}": round(float(fractions.get(c, 0.0)), 4) for c in HER2_CLASSES},
        "tiles_used": n_used,
        "tiles_rejected": n_rejected,
        "model": _model_label(config),
        "aggregation": config.agg,
        "her2_category": slide_call["her2_category"],
        "tumour_cells": tumour.get("cells", ""),
        "tumour_area_mm2": tumour.get("area_mm2", ""),
        "criteria": slide_call.get("criteria", {}).get("criteria", ""),
        "specimen": slide_call.get("criteria", {}).get("specimen", ""),
    }


def validate_score_config(config: ScoreConfig) -> dict | None:
    """Check the options that can be checked without a store (so a bad one fails before any work);
    returns what ``--calibration`` sets (``None`` without one)."""
    from wsi_her2.score.aggregate import AGGREGATORS

    if config.agg not in AGGREGATORS:
        raise ConfigError(f"--agg {config.agg!r}: choose one of {', '.join(AGGREGATORS)}")
    if config.explain and not scorer_capabilities(config.model).gradients:
        raise ConfigError(f"--explain needs a trained network: Grad-CAM has no gradients to follow in {config.model} "
                          "(rule-based: its measurements are its explanation); drop --explain or give a trained --model")
    if config.cpu_workers is not None and int(config.cpu_workers) < 1:
        raise ConfigError(f"--workers must be >= 1, got {config.cpu_workers}")
    scoring_rule_of(config)  # --criteria and --specimen
    return _calibration_record(config)


def scoring_rule_of(config: ScoreConfig) -> ScoringRule:
    """The guideline and specimen rule of ``--criteria`` / ``--specimen`` (TMA cores: biopsies unless told otherwise)."""
    return scoring_rule(config.criteria, config.specimen, tma=config.tma)


def _calibration_record(config: ScoreConfig) -> dict | None:
    """What ``--calibration`` sets (recorded in ``<id>.json``), or None."""
    if config.calibration is None:
        return None
    if not scorer_capabilities(config.model).calibration:
        raise ConfigError(f"--calibration: {config.model} takes no lab calibration (a trained model is calibrated by "
                          "training); drop --calibration or score with a scorer that takes one, such as the default")
    cal, data = load_calibration(config.calibration)
    return {"file": str(config.calibration), "dab_gain": cal.dab_gain, "cell_fraction_cut": cal.cell_fraction_cut,
            "n_slides": data.get("n_slides"), "leave_one_out": data.get("leave_one_out")}


def tumour_summary(measurements: dict, scored) -> dict:
    """Scored tumour (cells, mm²) over the QC-passed tiles, when the scorer measures it."""
    if "tumour_cell_count" not in measurements:
        return {}
    cells = np.nan_to_num(np.asarray(measurements["tumour_cell_count"], np.float64)[scored])
    area = np.nan_to_num(np.asarray(measurements.get("tumour_area_mm2", np.zeros_like(cells)), np.float64)[scored])
    nuclei = np.nan_to_num(np.asarray(measurements.get("cell_count", cells), np.float64)[scored])
    return {"cells": int(round(cells.sum())), "area_mm2": round(float(area.sum()), 4),
            "all_cells": int(round(nuclei.sum())),  # every nucleus found: the tumour share is cells / all_cells
            "rule": "nuclei weighted by epithelial cohesion (wsi_her2.models.ihc_score.IhcThresholds)"}


def _parts_key(config: ScoreConfig) -> dict:
    """What was scored and how (regions file and class, TMA cores, the guideline, cell outputs): a change re-scores."""
    rule = scoring_rule_of(config)
    return {"roi": str(config.roi) if config.roi else None, "roi_class": config.roi_class, "tma": bool(config.tma),
            "criteria": rule.criteria.name, "specimen": rule.specimen, "cells": bool(config.cells)}


def _tile_groups(store: PatchStore, config: ScoreConfig):
    if config.roi and config.tma:
        raise ConfigError("give --roi or --tma, not both")
    if config.roi:
        from wsi_her2.score.roi import region_groups

        return region_groups(store, config.roi, roi_class=config.roi_class)
    if config.tma:
        from wsi_her2.score.tma import core_groups

        return core_groups(store)
    return None


def _model_label(config: ScoreConfig) -> str:
    from wsi_her2.models.checkpoint import is_weights_path

    return Path(config.model).name if is_weights_path(config.model) else config.model


def find_stores(root: str | Path) -> list[Path]:
    """Every ``*.zarr`` patch store directly under ``root``."""
    root = Path(root)
    if not root.is_dir():
        raise StoreError(f"{root}: no such directory; run `wsi-her2 tile` first or name the stores")
    stores = {p for p in root.glob("*.zarr") if (p / "zarr.json").is_file()}
    # slides where `tile` found no tissue: scored as indeterminate from their record
    stores |= {p for p in map(no_tissue_store_path, root.glob(f"*{NO_TISSUE_SUFFIX}")) if not p.exists()}
    return sorted(stores)
