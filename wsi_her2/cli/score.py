"""``wsi-her2 score``: patch stores -> tile probabilities, slide call, QuPath GeoJSON, tables, heatmap."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from wsi_her2.vocab import TUMOUR_MODELS

AGG_CHOICES = ("vote", "mean", "asco")  # must equal wsi_her2.score.aggregate.AGGREGATORS keys (checked in tests)
CRITERIA_CHOICES = ("breast", "gastric")  # must equal wsi_her2.criteria.CRITERIA keys (checked in tests)
SPECIMEN_CHOICES = ("resection", "biopsy")  # must equal wsi_her2.criteria.SPECIMENS (checked in tests)
DEFAULT_MODEL_NAME = "ihc_dab"  # must equal wsi_her2.score.scorer.DEFAULT_MODEL (checked in tests); --help stays light


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score", help="score patch stores and write QuPath overlays, tables and heatmaps",
                       description="Score every unscored store in ./wsi-her2-out, or the stores named.")
    p.add_argument("stores", nargs="*", help="<slide-id>.zarr stores or directories holding them (default ./wsi-her2-out)")
    add_score_options(p)
    p.add_argument("-o", "--out", default=None, help="output directory (default: next to each store)")
    parts = p.add_argument_group("parts of the slide")
    parts.add_argument("--roi", default=None, metavar="GEOJSON",
                       help="score only tiles mostly inside these regions (QuPath File > Export objects: FeatureCollection or "
                            "feature array, level-0 px); one call per region (regions.csv) plus the call over all regions")
    parts.add_argument("--roi-class", default=None, metavar="CLASS", help="only regions of this QuPath class, e.g. Tumor")
    parts.add_argument("--tma", action="store_true",
                       help="tissue microarray: find the round cores, name them by grid (A1, A2, ...), one call per core (cores.csv)")
    p.add_argument("--cells", action="store_true",
                   help="also write every scored cell: <id>.cells.geojson.gz (QuPath detections classified by grade, with "
                        "membrane OD, completeness, pattern, tumour weight) and <id>.cells.parquet")
    p.add_argument("--workers", type=int, default=None, metavar="N", dest="cpu_workers",
                   help="processes scoring ihc_dab on CPU, chunk by chunk (default: one per CPU this process may use, "
                        "at most 16 and one per 512 tiles; 1: this process only)")
    p.add_argument("--overwrite", action="store_true", help="re-score slides already scored with this model and aggregation")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=run)


def add_score_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("scoring")
    g.add_argument("--model", default=DEFAULT_MODEL_NAME, help="registered model name (see `wsi-her2 models`) or a trained "
                   f".safetensors (default {DEFAULT_MODEL_NAME}, needs no weights)")
    g.add_argument("--weights", default=None, help="weights file for a registered architecture (.safetensors, or .pt loaded with weights_only)")
    g.add_argument("--agg", choices=AGG_CHOICES, default="asco", help="slide aggregation: vote (majority), mean (mean probability), asco (ASCO/CAP percentage rule; default)")
    g.add_argument("--criteria", choices=CRITERIA_CHOICES, default="breast",
                   help="the tumour's own guideline: breast (ASCO/CAP 2018 with the 2023 HER2-low/ultralow update; default) or "
                        "gastric (CAP/ASCP/ASCO 2016 gastroesophageal: basolateral or lateral staining counts as complete, "
                        ">= 10 %% of tumour cells, clusters of >= 5 cells in biopsies)")
    g.add_argument("--tumour-model", choices=TUMOUR_MODELS, default=None,
                   help="how ihc_dab weighs nuclei as tumour: cohesion (4-24 neighbours in 40 µm) or epithelium (the "
                        "detector trained on counterstain morphology); default: the scorer's own")
    g.add_argument("--specimen", choices=SPECIMEN_CHOICES, default=None,
                   help="with --criteria gastric: resection (percentage rule) or biopsy (a cluster of >= 5 cohesive stained "
                        "tumour cells decides); default resection, biopsy for --tma cores")
    g.add_argument("--tta", action="store_true", help="test-time augmentation: flips and 90° rotations, probabilities averaged")
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA)")
    g.add_argument("--min-tiles", type=int, default=10, help="fewer usable tiles than this -> indeterminate")
    g.add_argument("--gz", action="store_true", help="write .geojson.gz instead of .geojson")
    g.add_argument("--heatmap", action="append", default=[], metavar="MEASURE",
                   help="also write a continuous map of this tile measurement with a colour bar, e.g. p_3+, her2_index, "
                        "dab_od_membrane (repeatable): <id>.heatmap.MEASURE.png")
    g.add_argument("--explain", nargs="?", const="gradcam++", choices=("gradcam", "gradcam++"), default=None,
                   help="also write a Grad-CAM(++) saliency overlay and a per-tile saliency measurement (trained models)")
    g.add_argument("--calibration", default=None, metavar="CAL.json",
                   help="lab calibration of the default scorer's cut-points from `wsi-her2 calibrate` (recorded in every output)")
    g.add_argument("--no-report", action="store_true",
                   help="do not write the one-page report (<id>.report.html and <id>.report.pdf)")
    g.add_argument("--force", action="store_true",
                   help="score with a DAB scorer (the default) even when the stain check says the slide is not DAB IHC (e.g. H&E)")


def score_config_from_args(args: argparse.Namespace, *, progress: bool):
    from wsi_her2.score.pipeline import ScoreConfig

    return ScoreConfig(
        model=args.model, weights=args.weights, agg=args.agg, batch_size=args.batch_size, device=args.device,
        tta=args.tta, compile=args.compile, min_tiles=args.min_tiles, geojson_gz=args.gz, explain=args.explain,
        cpu_workers=getattr(args, "cpu_workers", None),
        heatmap_measures=list(getattr(args, "heatmap", None) or []),
        roi=getattr(args, "roi", None), roi_class=getattr(args, "roi_class", None), tma=getattr(args, "tma", False),
        overwrite=getattr(args, "overwrite", False), progress=progress, force=getattr(args, "force", False),
        calibration=getattr(args, "calibration", None), criteria=getattr(args, "criteria", "breast"),
        specimen=getattr(args, "specimen", None), cells=getattr(args, "cells", False),
        tumour_model=getattr(args, "tumour_model", None), no_report=getattr(args, "no_report", False),
    )


def run(args: argparse.Namespace) -> int:
    from wsi_her2.cli.common import cudnn_autotune, use_one_torch_thread_on_cpu, use_worker_threads_for_opencv
    from wsi_her2.errors import StoreError
    from wsi_her2.score.pipeline import find_stores, validate_score_config

    targets = args.stores or ["wsi-her2-out"]
    stores: list[Path] = []
    for t in targets:
        path = Path(t)
        stores.extend([path] if path.name.endswith(".zarr") else find_stores(path))
    if not stores:
        raise StoreError(f"no patch stores in {', '.join(targets)}; run `wsi-her2 tile` first")
    config = score_config_from_args(args, progress=not args.quiet and sys.stderr.isatty())
    validate_score_config(config)  # every option checked before any slide is touched
    use_one_torch_thread_on_cpu(config.model, config.device)
    use_worker_threads_for_opencv()  # ihc_dab's kernel threads are the parallelism, as in tile/demo/app
    with cudnn_autotune(config.device):
        return _score_each(stores, args, config)


def _score_each(stores: list[Path], args: argparse.Namespace, config) -> int:
    """Score the stores one by one, printing a line per slide; the exit code."""
    from wsi_her2.cli.exits import EachItem
    from wsi_her2.score.cpu_pool import ChunkPool
    from wsi_her2.score.pipeline import score_store

    with ChunkPool() as pool:  # ihc_dab's worker processes, started once for all the stores
        return _print_each(EachItem("score", stores, lambda store: score_store(store, out_dir=args.out, config=config,
                                                                            chunk_pool=pool), noun="stores"), args)


def _print_each(each, args: argparse.Namespace) -> int:
    """A line per scored store; the exit code."""
    for _, res in each:
        c = res.call
        note = " (already scored)" if res.skipped else ""
        note += f": {c.reason}" if c.reason and c.her2_score == "indeterminate" else ""
        print(f"{res.slide_id}: HER2 {c.her2_score} (confidence {c.confidence:.2f}, {args.agg}, "
              f"{res.tiles_used} tiles used, {res.tiles_rejected} rejected){note}")
    return each.exit_code()
