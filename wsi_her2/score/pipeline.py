"""Score one patch store: model -> tile probabilities -> slide call -> :class:`~wsi_her2.result.SlideResult` -> outputs.

Reads only the store (never the slide), so scoring runs wherever the stores are. :func:`score_store`
checks the options, reuses an earlier result whose outputs are intact, scores the store's QC-passed
tiles (those in a TMA core or region with ``--tma`` / ``--roi``), calls the slide and each part with
one rule (:mod:`wsi_her2.score.part_call`) and returns the result, once :mod:`wsi_her2.outputs` has
written every file from it, next to the store unless ``out_dir`` is given::

    <slide-id>.geojson       QuPath tiles (classified, measurable) + a slide annotation with the call
    <slide-id>.tiles.parquet one row per tile: coordinates, QC, class probabilities, call, measurements
    <slide-id>.heatmap.png   tile calls over the thumbnail (and --heatmap maps, TMA picture, report, cells)
    <slide-id>.json          the result: the call, how it was reached, model config, versions, timings, digests
    slides.csv               one row per slide (upserted, sorted by slide id); cores.csv / regions.csv likewise

``<slide-id>.json`` is written after every other file, so its presence means the slide is scored.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wsi_her2 import __version__
from wsi_her2.criteria import DEFAULT_CRITERIA, ScoringRule, scoring_rule
from wsi_her2.errors import ConfigError, StoreError
from wsi_her2.files import clean_stale_tmp, prepare_output_dir
from wsi_her2.outputs.manifest import check_result, read_result
from wsi_her2.outputs.slide_outputs import OutputOptions, write_result_files, write_slide_files
from wsi_her2.outputs.tables import ensure_slides_csv_row
from wsi_her2.result import Cells, PartCall, Provenance, SlideResult, TileResults, Tumour
from wsi_her2.score.calibration import Calibration, load_calibration
from wsi_her2.score.part_call import call_tiles
from wsi_her2.models.capabilities import capabilities_of
from wsi_her2.score.scorer import DEFAULT_MODEL, load_scoring_model, prepare_scorer, scorer_capabilities
from wsi_her2.store.no_tissue import SUFFIX as NO_TISSUE_SUFFIX
from wsi_her2.store.no_tissue import read_record as read_no_tissue_record
from wsi_her2.store.no_tissue import store_path_of as no_tissue_store_path
from wsi_her2.store.patch_store import PatchStore, open_store
from wsi_her2.store.verify import verify_store
from wsi_her2.tile.qc import reject_reason
from wsi_her2.vocab import HER2_CLASSES, INDETERMINATE

log = logging.getLogger(__name__)

#: The tile measurement ``--explain`` adds: the mean of the tile's saliency map.
SALIENCY_MEASURE = "saliency_mean"


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
    tumour_model: str | None = None  # --tumour-model: how ihc_dab weighs nuclei as tumour (None: its default)
    no_report: bool = False  # --no-report: no <id>.report.html / <id>.report.pdf


def score_store(store_path: str | Path, *, out_dir: str | Path | None = None, config: ScoreConfig | None = None, model=None,
                chunk_pool=None) -> SlideResult:
    """Score one complete patch store, write every output from the result (``<id>.json`` last) and return it.

    ``chunk_pool``: a :class:`~wsi_her2.score.cpu_pool.ChunkPool` kept across the stores of a
    command (``cpu_workers`` > 1 then starts its worker processes once)."""
    config = config or ScoreConfig()
    lab, calibration = validate_score_config(config) or (None, None)
    t_start = time.perf_counter()
    if not Path(store_path).exists() and (record := read_no_tissue_record(store_path)) is not None:
        return _score_no_tissue(Path(store_path), record, out_dir=out_dir, config=config)  # `tile` found no tissue
    store = open_store(store_path)
    out = prepare_output_dir(Path(out_dir) if out_dir else store.path.parent)
    clean_stale_tmp(out)  # temporary files of a killed run
    done = None if config.overwrite else _already_scored(out / f"{store.slide_id}.json", config, calibration)
    if done is not None:
        return done
    verify_store(store.path)  # a missing or damaged chunk is refused, never scored as black tiles
    rule = scoring_rule_of(config)
    model = _model_for(store, config, lab, rule, model)
    result = score_slide(store, model, config=config, rule=rule, calibration=calibration, chunk_pool=chunk_pool)
    result = write_slide_files(out, store, result, OutputOptions(
        geojson_gz=config.geojson_gz, heatmap_measures=tuple(config.heatmap_measures), report=not config.no_report))
    timings = {**result.timings_s, "total": round(time.perf_counter() - t_start, 3)}
    return write_result_files(out, dataclasses.replace(result, timings_s=timings))


def score_slide(store: PatchStore, model, *, config: ScoreConfig, rule: ScoringRule, calibration: dict | None,
                chunk_pool=None) -> SlideResult:
    """The result of ``model`` over ``store`` (its per-tile results included; nothing written)."""
    groups = _tile_groups(store, config)  # regions (--roi) or TMA cores (--tma); None: the whole slide
    pred, inference = _predict(store, model, config, groups, chunk_pool)
    if config.heatmap_measures:  # a bad name fails here, before any file is written
        _check_heatmap_measures(config, _tile_measurements(store, pred, list(model.wsi_her2_config.classes)))
    cut = calibration["cell_fraction_cut"] if calibration else None
    cell_xy_um = None if pred.cells is None else cell_positions_level0(store, pred.cells) * float(store.attrs["slide"]["mpp_um"])

    def call_part(use: np.ndarray) -> PartCall:  # one rule for the slide, each TMA core and each region
        return call_tiles(pred, use, agg=config.agg, min_tiles=config.min_tiles, rule=rule, cell_fraction_cut=cut,
                          cell_xy_um=cell_xy_um)

    parts = None if groups is None else groups.call_each(call_part, pred.scored, qc_pass=store.qc_pass,
                                                         mpp_um=float(store.attrs["slide"]["mpp_um"]))
    n_used = int(pred.scored.sum())
    return SlideResult(
        slide_id=store.slide_id, call=call_part(pred.scored), provenance=_provenance(store, model, config, calibration, inference),
        tiles_used=n_used, tiles_rejected=int(store.n_tiles - n_used), tumour=tumour_summary(pred.measurements, pred.scored, tumour_model=_tumour_model_of(model)),
        qc_summary=store.attrs.get("qc", {}).get("summary", {}), groups=parts, timings_s={"inference": inference["seconds"]},
        tiles=_tile_results(store, model, pred, _reject_reasons(store, groups), config),
    )


def _reject_reasons(store: PatchStore, groups) -> list[str | None]:
    """Why each tile was not scored: its QC flags, or lying outside every part (``--tma`` / ``--roi``)."""
    # A store holds few distinct flag values and up to ~10^5 tiles: one reason per value, not per tile.
    flags, inverse = np.unique(np.asarray(store.qc_flags), return_inverse=True)
    by_flag = [reject_reason(int(f)) for f in flags]
    reasons = np.array(by_flag, dtype=object)[inverse.reshape(-1)]
    if groups is not None:  # QC's reason first; a tile that passed QC but lies in no part says so
        passed = np.array([r is None for r in by_flag], dtype=bool)[inverse.reshape(-1)]
        reasons[passed & ~groups.inside] = f"outside {groups.kind}s"
    return reasons.tolist()


def _check_heatmap_measures(config: ScoreConfig, measurements: dict[str, np.ndarray]) -> None:
    """Refuse ``--heatmap`` names that are no tile measurement, once the measurements are known (after the model
    ran: they depend on the store's QC arrays and the scorer's own) and before any output is written."""
    known = {*measurements, *((SALIENCY_MEASURE,) if config.explain else ())}
    unknown = [m for m in config.heatmap_measures if m not in known]
    if unknown:
        raise ConfigError(f"--heatmap {', '.join(unknown)}: no such tile measurement; choose from {', '.join(sorted(known))}")


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


def _provenance(store: PatchStore, model, config: ScoreConfig, calibration: dict | None, inference: dict) -> Provenance:
    return Provenance(
        model=_model_label(config), aggregation=config.agg, package_version=__version__,
        model_config=model.wsi_her2_config.to_dict(), weights=config.weights, store=str(store.path),
        slide_sha256=store.attrs["slide"]["sha256"], tile_mpp_um=store.attrs["tiling"]["effective_mpp_um"], tile_px=store.tile_px,
        calibration=calibration, inference=inference, scope=_parts_key(config),
    )


def _tile_results(store: PatchStore, model, pred, reasons: list[str | None], config: ScoreConfig) -> TileResults:
    """Per tile: its call, why it was not scored, every measurement; the cells (``--cells``) and saliency (``--explain``)."""
    classes = tuple(model.wsi_her2_config.classes)
    calls = np.full(store.n_tiles, -1, dtype=np.int64)
    if pred.scored.any():
        calls[pred.scored] = np.argmax(pred.probs[pred.scored], axis=1)
    measurements = _tile_measurements(store, pred, list(classes))
    saliency = None
    if config.explain:
        from wsi_her2.score.saliency import tile_saliency

        saliency = tile_saliency(store, model, indices=np.nonzero(pred.scored)[0], method=config.explain, device=config.device)
        mean = np.full(store.n_tiles, np.nan, np.float32)
        mean[saliency.tiles] = saliency.maps.reshape(len(saliency.tiles), -1).mean(axis=1)
        measurements[SALIENCY_MEASURE] = mean
    cells = None
    if config.cells and pred.cells is not None:
        cells = Cells(pred.cells.columns, cell_positions_level0(store, pred.cells))
    return TileResults(classes, calls, tuple(reasons), measurements, cells=cells, saliency=saliency)


def cell_positions_level0(store: PatchStore, cells) -> np.ndarray:
    """``(cells, 2)`` x, y of each scored cell in level-0 pixels of the slide file."""
    return cells.level0_xy(store.coords_level0, store.tile_size_level0 / store.tile_px)


def _score_no_tissue(store_path: Path, record: dict, *, out_dir: str | Path | None, config: ScoreConfig) -> SlideResult:
    """``<id>.json``, the report and the ``slides.csv`` row of a slide where ``tile`` found no tissue."""
    from wsi_her2.score.aggregate import HER2_CATEGORIES, her2_category

    out = prepare_output_dir(Path(out_dir) if out_dir else store_path.parent)
    category = her2_category(INDETERMINATE, None)
    call = PartCall(her2_score=INDETERMINATE, confidence=0.0, class_fractions=dict.fromkeys(HER2_CLASSES, 0.0),
                    n_tiles_used=0, method=config.agg, details={"reason": record["reason"]}, her2_category=category,
                    her2_category_text=HER2_CATEGORIES[category], criteria=scoring_rule_of(config).to_dict())
    provenance = Provenance(model=_model_label(config), aggregation=config.agg, package_version=__version__,
                            slide_path=record.get("slide"))
    result = SlideResult(slide_id=store_path.name.removesuffix(".zarr"), call=call, provenance=provenance, no_tissue=record)
    if not config.no_report:  # the report says why there is no call, with the QC picture the tile stage drew
        from wsi_her2.outputs.report import write_slide_report

        reports = write_slide_report(out, result, qc_png=store_path.parent / f"{result.slide_id}.qc.png")
        result = result.with_outputs({**result.outputs, **reports})
    return write_result_files(out, result)


def _already_scored(json_path: Path, config: ScoreConfig, calibration: dict | None) -> SlideResult | None:
    """The earlier result when this slide was scored with the same model, rule, parts, outputs and calibration,
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
    return SlideResult.from_record(done, slide_id=sid, skipped=True)


def _model_for(store: PatchStore, config: ScoreConfig, lab: Calibration | None, rule: ScoringRule, model=None):
    """The model to score ``store`` with, set up for the slide, after the check of its stain (its tile size and
    µm/px are checked where every scoring path passes: ``predict_store``)."""
    if model is None:
        model = load_scoring_model(config.model, weights=config.weights, store_tile_px=store.tile_px,
                                   store_mpp_um=float(store.attrs["tiling"]["effective_mpp_um"]))
    return prepare_scorer(store, model, criteria=rule.criteria, calibration=lab, force=config.force,
                          tumour_model=config.tumour_model)


def _tile_measurements(store: PatchStore, pred, classes: list[str]) -> dict[str, np.ndarray]:
    """Every per-tile number the outputs carry: class probabilities, the stored QC, the scorer's own."""
    qc = {name: store.array(name) for name in ("tissue_fraction", "laplacian_var", "sharpness", "pen_fraction")
          if store.has_array(name)}
    probs_named = {f"p_{c}": pred.probs[:, i] for i, c in enumerate(classes)}
    # A scorer measurement named like a QC value (ihc_dab's own OD-based "tissue_fraction") is kept
    # as "scorer_<name>": the QC value, the one that decided the tile's fate, keeps its name.
    scorer = {(f"scorer_{k}" if k in qc else k): v for k, v in pred.measurements.items()}
    return {**probs_named, **qc, **scorer}


def validate_score_config(config: ScoreConfig) -> tuple[Calibration, dict] | None:
    """Check the options that can be checked without a store (so a bad one fails before any work);
    returns ``--calibration``'s :class:`Calibration` and its record in ``<id>.json`` (``None`` without one)."""
    from wsi_her2.score.aggregate import AGGREGATORS

    if config.agg not in AGGREGATORS:
        raise ConfigError(f"--agg {config.agg!r}: choose one of {', '.join(AGGREGATORS)}")
    if config.explain and not scorer_capabilities(config.model).gradients:
        raise ConfigError(f"--explain needs a trained network: Grad-CAM has no gradients to follow in {config.model} "
                          "(rule-based: its measurements are its explanation); drop --explain or give a trained --model")
    if config.cells and not scorer_capabilities(config.model).cell_evidence:
        raise ConfigError(f"--cells: {config.model} reports no cells (it calls tiles); drop --cells or score with a "
                          "scorer that counts cells, such as the default")
    if config.cpu_workers is not None and int(config.cpu_workers) < 1:
        raise ConfigError(f"--workers must be >= 1, got {config.cpu_workers}")
    if config.roi and config.tma:
        raise ConfigError("give --roi or --tma, not both")
    if config.roi:  # read (once per command: cached) before any store, so a bad regions file fails first
        from wsi_her2.score.roi import read_regions

        read_regions(config.roi, roi_class=config.roi_class)
    scoring_rule_of(config)  # --criteria and --specimen
    return _calibration_record(config)


def scoring_rule_of(config: ScoreConfig) -> ScoringRule:
    """The guideline and specimen rule of ``--criteria`` / ``--specimen`` (TMA cores: biopsies unless told otherwise)."""
    return scoring_rule(config.criteria, config.specimen, tma=config.tma)


def _calibration_record(config: ScoreConfig) -> tuple[Calibration, dict] | None:
    """What ``--calibration`` sets and its record in ``<id>.json``, or None."""
    if config.calibration is None:
        return None
    if not scorer_capabilities(config.model).calibration:
        raise ConfigError(f"--calibration: {config.model} takes no lab calibration (a trained model is calibrated by "
                          "training); drop --calibration or score with a scorer that takes one, such as the default")
    cal, data = load_calibration(config.calibration)
    return cal, {"file": str(config.calibration), "dab_gain": cal.dab_gain, "cell_fraction_cut": cal.cell_fraction_cut,
                 "n_slides": data.get("n_slides"), "leave_one_out": data.get("leave_one_out")}


def _tumour_model_of(model) -> str | None:
    """How ``model`` weighed nuclei as tumour (None: it weighs none)."""
    return model.tumour_model if capabilities_of(model).tumour_models else None


#: A warning when more than this share of the scored tiles have implausibly few nuclei.
LOW_NUCLEI_WARN_FRACTION = 0.10


def tumour_summary(measurements: dict, scored, *, tumour_model: str | None = None) -> Tumour | None:
    """Scored tumour (cells, mm²) over the QC-passed tiles, when the scorer measures it; and the tissue
    tiles with implausibly few nuclei (``nuclear_density_low``: tumour cells may be under-counted there)."""
    if "tumour_cell_count" not in measurements:
        return None
    cells = np.nan_to_num(np.asarray(measurements["tumour_cell_count"], np.float64)[scored])
    area = np.nan_to_num(np.asarray(measurements.get("tumour_area_mm2", np.zeros_like(cells)), np.float64)[scored])
    nuclei = np.nan_to_num(np.asarray(measurements.get("cell_count", cells), np.float64)[scored])
    low = np.nan_to_num(np.asarray(measurements.get("nuclear_density_low", np.zeros_like(cells)), np.float64)[scored]) > 0.5
    warning = None
    if low.size and low.mean() > LOW_NUCLEI_WARN_FRACTION:
        warning = (f"nuclei implausibly few in {int(low.sum())} of {low.size} tissue tiles (fewer than 500 per mm² of "
                   "tissue): faint counterstain or DAB-masked nuclei; tumour cells may be under-counted")
        log.warning("%s", warning)
    return Tumour(cells=int(round(cells.sum())), area_mm2=round(float(area.sum()), 4), all_cells=int(round(nuclei.sum())),
                  rule=f"nuclei weighted as tumour by the {tumour_model or 'scorer'}'s rule (wsi_her2.models.ihc_score)",
                  tiles_few_nuclei=int(low.sum()), warning=warning)


def _parts_key(config: ScoreConfig) -> dict:
    """What was scored and how (regions file and class, TMA cores, the guideline, cell outputs, the report and
    the measure maps asked for): a change re-scores."""
    rule = scoring_rule_of(config)
    return {"roi": str(config.roi) if config.roi else None, "roi_class": config.roi_class, "tma": bool(config.tma),
            "criteria": rule.criteria.name, "specimen": rule.specimen, "cells": bool(config.cells),
            "tumour_model": config.tumour_model, "report": not config.no_report,
            "heatmap": sorted(set(config.heatmap_measures))}


def _tile_groups(store: PatchStore, config: ScoreConfig):
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
