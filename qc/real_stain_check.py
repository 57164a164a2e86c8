"""Real-stain check through the whole command line: real IHC images -> slides -> tile -> score.

Every real HER2 IHC patch of ``../shared/fixtures/ihc_dev`` (1024 px JPEGs, about 1.0 µm/px,
labels in ``labels.csv``) is made into slides as a user would have them, then goes through
``wsi-her2 tile SLIDE -o OUT --mpp M`` and ``wsi-her2 score STORE`` as subprocesses, with
default options, exactly as a user runs them. So the tile stage's tissue detection and focus
QC act on real stain before the scorer sees anything.

Slide variants (``--variants``, default ``full,core``):

- ``full``: the whole patch as a slide (tissue from edge to edge);
- ``core``: the disc of the patch as a round tissue-microarray-like core on tinted glass
  (lavender, RGB 234, 233, 242, with slight noise), 64 px of glass around it;
- ``rect``: the whole patch on the same glass with a 64 px margin.

The slide is written at ``--mpp-out`` µm/px (default 1.0: the patch as it is; 0.25 or 0.5
resample it first, area mean when coarsening, bicubic when refining, as a scan at 40x/20x
would present it) and tiled at ``--tile-mpp`` (default: the slide's own ``--mpp-out``).

Each slide is tiled once and scored under each guideline of ``--criteria`` (default
``breast,gastric``: ``wsi-her2 score --criteria C --cells``). Printed per slide and guideline:
the source slide's label, the call, the HER2 category, the scored tumour area (mm²) and tumour
cells, tiles used out of all tiles, the rejected tiles per QC reason (``qc_reason`` of
``<id>.tiles.parquet``), and how the counted tumour cells agree with the tumour drawn in
``qc/annotations/<image>.geojson`` (precision: share of the counted tumour weight inside the
drawn tumour; recall: share of the nuclei found inside it that are counted; read from
``<id>.cells.parquet``, so the tile stage's tissue and focus gates act first; see
``qc/tumour_agreement.py``). A failing command (e.g. "no tissue found") is a row with its
error. Then per variant and guideline: exact agreement over all images (no call = miss), the
confusion matrix and quadratic-weighted kappa over the called slides
(:func:`wsi_her2.batch.report.agreement_report`), the counts of "no tissue" failures, other
failures and indeterminate calls, and the pooled annotation agreement.

``--tma``: every image's ``core`` slide is also placed on one tissue microarray slide (cores
on a grid aligned with the tiles and with the slide's JPEG blocks, so a core's tiles hold the
pixels of its own slide), tiled once and scored with ``--tma --specimen resection`` under each
guideline: every core must get the call of its own slide (one rule for slides and cores).

The labels are the *source slides'* scores, not the patches': this is a check of the whole
chain on real stain, never a target to tune thresholds to.

Usage::

    python qc/real_stain_check.py [--fixtures DIR] [--out DIR] [--variants full,core]
        [--criteria breast,gastric] [--tma] [--mpp-out 1.0] [--tile-mpp M] [--workers 1]
        [--json FILE] [--limit N]
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from wsi_her2.batch.report import agreement_report, format_agreement
from wsi_her2.criteria import CRITERIA
from wsi_her2.synthetic.image_slide import (
    LAVENDER_GLASS_RGB,
    composite_on_glass,
    resample_to_mpp,
    write_image_slide,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "qc"))  # the annotation agreement (qc/tumour_agreement.py)
from tumour_agreement import Agreement, agreement, read_annotation  # noqa: E402

DEFAULT_FIXTURES = REPO_ROOT.parent / "shared" / "fixtures" / "ihc_dev"
DEFAULT_ANNOTATIONS = REPO_ROOT / "qc" / "annotations"
#: Pixel size of the dev patches (``shared/fixtures/README.md``: treat them as 1.0 µm/px).
SOURCE_MPP_UM = 1.0
VARIANTS = ("full", "core", "rect")
DEFAULT_VARIANTS = ("full", "core")
GLASS_MARGIN_PX = 64
LABEL_COLUMN = "her2_score_of_source_slide"
#: TMA cores lie on a grid whose pitch is a multiple of both the tile (224 px) and the slide's
#: JPEG tile (256 px): a core's tiles then hold the same pixels as its own slide's.
TMA_PITCH_UNIT_PX = 1792
#: Largest TMA slide built, pixels (a 0.25 µm/px TMA of 20 cores would be ~1 Gpx).
TMA_MAX_PX = 300_000_000


@dataclass(frozen=True)
class CheckOptions:
    """How each image becomes a slide and how the command line is run on it."""

    out_dir: Path
    mpp_out_um: float = SOURCE_MPP_UM
    tile_mpp_um: float | None = None  # None: tile at the slide's own pixel size
    glass_rgb: tuple[int, int, int] = LAVENDER_GLASS_RGB
    tile_args: tuple[str, ...] = ()
    score_args: tuple[str, ...] = ()
    criteria: tuple[str, ...] = tuple(CRITERIA)
    annotations: Path = DEFAULT_ANNOTATIONS
    timeout_s: float = 900.0
    command: tuple[str, ...] = field(default_factory=lambda: tuple(wsi_her2_command()))

    @property
    def tile_mpp(self) -> float:
        return self.mpp_out_um if self.tile_mpp_um is None else self.tile_mpp_um


def wsi_her2_command() -> list[str]:
    """The ``wsi-her2`` console script next to this Python, else ``python -m wsi_her2``."""
    script = Path(sys.executable).with_name("wsi-her2")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "wsi_her2"]


def read_labels(fixtures: Path) -> list[tuple[Path, str]]:
    """``(image path, label)`` for every row of ``fixtures/labels.csv``."""
    with (fixtures / "labels.csv").open(newline="") as fh:
        return [(fixtures / r["image"], r[LABEL_COLUMN].strip()) for r in csv.DictReader(fh)]


def slide_id(image: Path, variant: str, mpp_out_um: float) -> str:
    return f"{image.stem}.{variant}.{mpp_out_um:g}um"


def margin_px(variant: str, mpp_out_um: float) -> int:
    """Glass around the patch in slide pixels (0 for ``full``)."""
    return 0 if variant == "full" else round(GLASS_MARGIN_PX * SOURCE_MPP_UM / mpp_out_um)


def slide_rgb(image: Path, variant: str, opts: CheckOptions) -> np.ndarray:
    """The pixels of ``image`` as the ``variant`` slide at ``opts.mpp_out_um``."""
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r} is unknown; use one of {VARIANTS}")
    rgb = np.asarray(Image.open(image).convert("RGB"))
    rgb = resample_to_mpp(rgb, SOURCE_MPP_UM, opts.mpp_out_um)
    if variant != "full":
        # Re-lit from the patch's own bright end (its glass, or its palest tissue when it has none)
        # to the tinted glass, keeping optical density: pale tissue lands a few levels below glass.
        src_glass = tuple(float(v) for v in np.percentile(rgb.reshape(-1, 3), 99.5, axis=0))
        rgb = composite_on_glass(rgb, glass_rgb=opts.glass_rgb, shape="core" if variant == "core" else "rect",
                                 margin_px=margin_px(variant, opts.mpp_out_um), seed=0, relight_from_rgb=src_glass)
    return rgb


def make_slide(image: Path, variant: str, opts: CheckOptions) -> Path:
    """Write ``image`` as the ``variant`` slide at ``opts.mpp_out_um``; returns its path."""
    rgb = slide_rgb(image, variant, opts)
    slides = opts.out_dir / "slides"
    slides.mkdir(parents=True, exist_ok=True)
    return write_image_slide(rgb, slides / f"{slide_id(image, variant, opts.mpp_out_um)}.svs",
                             mpp_um=opts.mpp_out_um)


def _error_line(proc: subprocess.CompletedProcess, what: str, path: Path) -> str:
    """The command's own one-line error (last ``error:`` line of stderr), else its exit code;
    the slide or store path it names is shortened to its file name."""
    lines = [ln.strip() for ln in (proc.stderr or "").splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error:" in ln]
    text = (errors or lines or [f"exit code {proc.returncode}"])[-1]
    text = text.split("error:", 1)[1].strip() if "error:" in text else text
    return f"{what}: {text.replace(str(path), path.name)}"


def _run(args: list[str], opts: CheckOptions) -> subprocess.CompletedProcess:
    return subprocess.run([*opts.command, *args], capture_output=True, text=True, timeout=opts.timeout_s,
                          check=False)


def _rejected_by_reason(parquet: Path) -> dict[str, int]:
    import pyarrow.parquet as pq

    schema = pq.read_schema(parquet)
    column = next((c for c in ("qc_reason", "reason") if c in schema.names), None)
    if column is None:
        return {}
    reasons = pq.read_table(parquet, columns=[column]).column(column).to_pylist()
    return dict(sorted(Counter(r for r in reasons if r).items()))


def read_outputs(run_dir: Path, sid: str) -> dict:
    """The row fields from ``<id>.json`` and ``<id>.tiles.parquet``; keys the scorer does not
    (yet) write are None."""
    result = json.loads((run_dir / f"{sid}.json").read_text())
    call = result.get("call") or {}
    tumour = result.get("tumour") or {}
    row = result.get("row") or {}
    used = row.get("tiles_used", call.get("n_tiles_used"))
    rejected = row.get("tiles_rejected")
    parquet = run_dir / f"{sid}.tiles.parquet"
    return {
        "call": call.get("her2_score"),
        "category": call.get("her2_category"),
        "tumour_area_mm2": tumour.get("area_mm2"),
        "tumour_cells": tumour.get("cells"),
        "tiles_used": used,
        "tiles_total": None if used is None or rejected is None else used + rejected,
        "rejected": _rejected_by_reason(parquet) if parquet.is_file() else {},
        "reason": (call.get("details") or {}).get("reason") if call.get("her2_score") == "indeterminate" else None,
    }


def annotation_agreement(cells_parquet: Path, annotation: Path, *, offset_px: float, patch_px_per_px: float) -> Agreement | None:
    """The scored cells (``<id>.cells.parquet``, level-0 px of the slide) against the patch's drawn
    tumour; ``offset_px``: the glass margin before the patch; ``patch_px_per_px``: patch px per slide px."""
    import pyarrow.parquet as pq

    if not (cells_parquet.is_file() and annotation.is_file()):
        return None
    cells = pq.read_table(cells_parquet, columns=["x_level0", "y_level0", "tumour_weight"]).to_pydict()
    x = (np.asarray(cells["x_level0"]) - offset_px) * patch_px_per_px
    y = (np.asarray(cells["y_level0"]) - offset_px) * patch_px_per_px
    return agreement(x, y, np.asarray(cells["tumour_weight"]), read_annotation(annotation))


def _empty_row(image: Path, label: str, variant: str, sid: str, criteria: str) -> dict:
    return {"image": image.name, "variant": variant, "slide": sid, "label": label, "criteria": criteria, "call": None,
            "category": None, "tumour_area_mm2": None, "tumour_cells": None, "tiles_used": None, "tiles_total": None,
            "rejected": {}, "reason": None, "agreement": None, "error": None}


def _score_rows(image: Path, label: str, variant: str, store: Path, run_dir: Path, opts: CheckOptions) -> list[dict]:
    """One row per guideline: ``wsi-her2 score --criteria C --cells`` into ``run_dir/C``."""
    sid = store.name.removesuffix(".zarr")
    rows = []
    for criteria in opts.criteria:
        row = _empty_row(image, label, variant, sid, criteria)
        out = run_dir / criteria
        score = _run(["score", str(store), "-o", str(out), "-q", "--cells", "--criteria", criteria, *opts.score_args], opts)
        if score.returncode != 0:
            row["error"] = _error_line(score, "score", store)
        else:
            row.update(read_outputs(out, sid))
            found = annotation_agreement(out / f"{sid}.cells.parquet", opts.annotations / f"{image.stem}.geojson",
                                         offset_px=margin_px(variant, opts.mpp_out_um),
                                         patch_px_per_px=opts.mpp_out_um / SOURCE_MPP_UM)
            row["agreement"] = None if found is None else found.astuple()
        rows.append(row)
    return rows


def check_image(image: Path, label: str, variant: str, opts: CheckOptions) -> list[dict]:
    """One image as one slide variant through ``wsi-her2 tile`` and ``wsi-her2 score`` (once per guideline).

    Returns one row per guideline; a failing step gives rows whose ``error`` says which step
    failed and why (the command's own error line), never an exception.
    """
    started = time.perf_counter()
    sid = slide_id(image, variant, opts.mpp_out_um)
    run_dir = opts.out_dir / "runs" / sid  # one directory per slide: parallel runs never share slides.csv
    try:
        slide = make_slide(image, variant, opts)
        tile = _run(["tile", str(slide), "-o", str(run_dir), "--mpp", f"{opts.tile_mpp:g}", "-q",
                     *opts.tile_args], opts)
        if tile.returncode != 0:
            rows = [_empty_row(image, label, variant, sid, c) | {"error": _error_line(tile, "tile", slide)}
                    for c in opts.criteria]
        else:
            rows = _score_rows(image, label, variant, run_dir / f"{sid}.zarr", run_dir, opts)
    except subprocess.TimeoutExpired as exc:
        rows = [_empty_row(image, label, variant, sid, c) | {"error": f"timeout after {exc.timeout:.0f} s"}
                for c in opts.criteria]
    except (OSError, ValueError, KeyError) as exc:  # unreadable image or outputs: a row, not a crash
        rows = [_empty_row(image, label, variant, sid, c) | {"error": f"{type(exc).__name__}: {exc}"}
                for c in opts.criteria]
    seconds = round(time.perf_counter() - started, 1)
    return [r | {"seconds": seconds} for r in rows]


def _fmt(value: object, spec: str = "") -> str:
    if value is None:
        return "-"
    return format(value, spec) if spec else str(value)


def _agreement_text(values: tuple | list | None) -> str:
    if values is None:
        return "    -     -"
    a = Agreement(*values)
    return f"{_fmt(None if math.isnan(a.precision) else a.precision, '5.2f'):>5} {_fmt(None if math.isnan(a.recall) else a.recall, '5.2f'):>5}"


def format_row(row: dict) -> str:
    used = f"{_fmt(row['tiles_used'])}/{_fmt(row['tiles_total'])}"
    rejected = " ".join(f"{k}:{v}" for k, v in row["rejected"].items()) or "-"
    tail = f"ERROR {row['error']}" if row["error"] else rejected
    return (f"{row['image']:<20} {row['variant']:<5} {row['criteria']:<8} {row['label']:>5} {_fmt(row['call']):>13} "
            f"{_fmt(row['category']):>17} {_fmt(row['tumour_area_mm2'], '.3f'):>8} {_fmt(row['tumour_cells']):>6} "
            f"{_agreement_text(row['agreement'])} {used:>7}  {tail}")


HEADER = (f"{'image':<20} {'var':<5} {'criteria':<8} {'label':>5} {'call':>13} {'category':>17} {'tum_mm2':>8} "
          f"{'cells':>6} {'prec':>5} {'recall':>5} {'used':>7}  rejected tiles by reason / error")


def summarise(rows: list[dict]) -> dict:
    """Agreement of one variant's rows (one guideline) with their labels, the failure counts and
    the pooled agreement of the counted tumour cells with the drawn tumour."""
    report = agreement_report([
        {"slide": r["slide"], "label": r["label"], "her2_score": r["call"],
         "status": "done" if r["error"] is None else "failed"} for r in rows
    ])
    pooled = sum((Agreement(*r["agreement"]) for r in rows if r.get("agreement") is not None), Agreement())
    return {
        "n": len(rows),
        "exact": sum(r["call"] == r["label"] for r in rows),
        "no_tissue": sum("no tissue" in (r["error"] or "") for r in rows),
        "other_failures": sum(bool(r["error"]) and "no tissue" not in r["error"] for r in rows),
        "indeterminate": sum(r["call"] == "indeterminate" for r in rows),
        "agreement": report,
        "tumour_precision": pooled.precision, "tumour_recall": pooled.recall, "tumour_in_benign": pooled.benign_share,
    }


def format_summary(variant: str, s: dict) -> str:
    kappa = (s["agreement"] or {}).get("quadratic_weighted_kappa")
    n_called = (s["agreement"] or {}).get("n_compared", 0)
    lines = [(
        f"[{variant}] exact agreement {s['exact']}/{s['n']} over all images (no call = miss); "
        f"quadratic-weighted kappa {'n/a' if kappa is None else f'{kappa:.3f}'} over {n_called} called slides; "
        f"no tissue {s['no_tissue']}, other failures {s['other_failures']}, indeterminate {s['indeterminate']}"
    )]
    if s.get("tumour_precision") is not None and not math.isnan(s["tumour_precision"]):
        lines.append(f"[{variant}] counted tumour cells vs drawn tumour (qc/annotations): precision "
                     f"{s['tumour_precision']:.3f} (target >= 0.90), recall {s['tumour_recall']:.3f} (target >= 0.80), "
                     f"in benign epithelium {s['tumour_in_benign']:.3f}")
    if n_called:
        lines.append(format_agreement({**s["agreement"], "not_scored": []}))  # the table lists them
    return "\n".join(lines)


# --- the TMA path ----------------------------------------------------------------------------------------
def tma_layout(n: int) -> tuple[int, int]:
    """(rows, cols) of a grid holding ``n`` cores, about square."""
    cols = max(1, math.ceil(math.sqrt(n)))
    return math.ceil(n / cols), cols


def make_tma(images: list[Path], opts: CheckOptions) -> tuple[Path, dict[str, str]] | None:
    """Every image's ``core`` slide pixels on one TMA slide; its path and ``{grid name: image}`` (None: too large)."""
    blocks = [slide_rgb(image, "core", opts) for image in images]
    side = max(max(b.shape[:2]) for b in blocks)
    pitch = TMA_PITCH_UNIT_PX * math.ceil((side + TMA_PITCH_UNIT_PX // 8) / TMA_PITCH_UNIT_PX)
    rows, cols = tma_layout(len(blocks))
    if rows * cols * pitch * pitch > TMA_MAX_PX:
        return None
    noise = np.clip(np.rint(np.random.default_rng(1).normal(0.0, 0.8, (rows * pitch, cols * pitch, 3))), -2, 2)
    canvas = np.clip(np.asarray(opts.glass_rgb, np.float32) + noise, 0, 255).astype(np.uint8)  # the cores' glass
    names = {}
    for k, (image, block) in enumerate(zip(images, blocks)):
        r, c = divmod(k, cols)
        canvas[r * pitch: r * pitch + block.shape[0], c * pitch: c * pitch + block.shape[1]] = block
        names[f"{chr(ord('A') + r)}{c + 1}"] = image.name
    slides = opts.out_dir / "slides"
    slides.mkdir(parents=True, exist_ok=True)
    return write_image_slide(canvas, slides / f"tma.{opts.mpp_out_um:g}um.svs", mpp_um=opts.mpp_out_um), names


def check_tma(images: list[Path], rows: list[dict], opts: CheckOptions) -> dict:
    """The TMA of the images' cores through ``tile`` and ``score --tma``: per guideline, which cores
    get the call of their own ``core`` slide (``rows``)."""
    made = make_tma(images, opts)
    if made is None:
        return {"error": f"a TMA at {opts.mpp_out_um:g} µm/px would exceed {TMA_MAX_PX:,} px; use --mpp-out 1.0"}
    slide, names = made
    run_dir = opts.out_dir / "runs" / "tma"
    tile = _run(["tile", str(slide), "-o", str(run_dir), "--mpp", f"{opts.tile_mpp:g}", "-q", *opts.tile_args], opts)
    if tile.returncode != 0:
        return {"error": _error_line(tile, "tile", slide)}
    own = {(r["image"], r["criteria"]): r["call"] for r in rows if r["variant"] == "core"}
    out: dict = {"cores": {}}
    for criteria in opts.criteria:
        score = _run(["score", str(run_dir / f"{slide.stem}.zarr"), "-o", str(run_dir / criteria), "-q", "--tma",
                      "--specimen", "resection", "--criteria", criteria, *opts.score_args], opts)
        if score.returncode != 0:
            out["error"] = _error_line(score, "score", slide)
            continue
        with (run_dir / criteria / "cores.csv").open(newline="") as fh:
            cores = {r["name"]: r for r in csv.DictReader(fh)}
        out["cores"][criteria] = {name: {"image": image, "tma": cores.get(name, {}).get("her2_score") or
                                         cores.get(name, {}).get("status", "not found"),
                                         "own_slide": own.get((image, criteria))} for name, image in names.items()}
    return out


def format_tma(tma: dict) -> str:
    if "cores" not in tma:
        return f"[tma] {tma.get('error')}"
    lines = [f"[tma] {tma['error']}"] if tma.get("error") else []
    for criteria, cores in tma["cores"].items():
        same = [c for c in cores.values() if c["tma"] == c["own_slide"]]
        differ = [f"{n} {c['image'][:5]} {c['own_slide']}->{c['tma']}" for n, c in cores.items() if c["tma"] != c["own_slide"]]
        lines.append(f"[tma, {criteria}] {len(same)}/{len(cores)} cores get the call of their own slide"
                     + (f"; differ: {', '.join(differ)}" if differ else ""))
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fixtures", type=Path, default=DEFAULT_FIXTURES, help="folder with labels.csv and the images")
    p.add_argument("--annotations", type=Path, default=DEFAULT_ANNOTATIONS, help="drawn tumour, <image stem>.geojson")
    p.add_argument("--out", type=Path, default=None, help="working folder for slides and outputs (default: a temporary one)")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--criteria", default=",".join(CRITERIA), help=f"comma-separated, of {', '.join(CRITERIA)}")
    p.add_argument("--tma", action="store_true", help="also score the cores on one TMA slide (--tma) and compare")
    p.add_argument("--mpp-out", type=float, default=SOURCE_MPP_UM, help="slide pixel size, µm/px (resampled from 1.0)")
    p.add_argument("--tile-mpp", type=float, default=None, help="wsi-her2 tile --mpp (default: --mpp-out)")
    p.add_argument("--workers", type=int, default=1, help="slides processed at once (each runs its own commands)")
    p.add_argument("--tile-args", default="", help="extra options for wsi-her2 tile, e.g. '--min-tissue 0.2'")
    p.add_argument("--score-args", default="", help="extra options for wsi-her2 score")
    p.add_argument("--limit", type=int, default=None, help="only the first N images")
    p.add_argument("--json", type=Path, default=None, help="also save rows and summaries as JSON here")
    args = p.parse_args(argv)
    args.variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    args.criteria = tuple(v.strip() for v in args.criteria.split(",") if v.strip())
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad or not args.variants:
        p.error(f"--variants {','.join(bad) or '(none)'}: choose from {', '.join(VARIANTS)}")
    if not args.criteria or any(c not in CRITERIA for c in args.criteria):
        p.error(f"--criteria {','.join(args.criteria) or '(none)'}: choose from {', '.join(CRITERIA)}")
    if not 0.05 <= args.mpp_out <= 20 or args.workers < 1:
        p.error("--mpp-out must lie within 0.05-20 µm/px and --workers be >= 1")
    if not (args.fixtures / "labels.csv").is_file():
        p.error(f"no labels.csv under {args.fixtures}; pass --fixtures")
    if args.tma and "core" not in args.variants:
        p.error("--tma compares cores with their own slides: include the core variant")
    return args


def run_check(args: argparse.Namespace, out_dir: Path) -> dict:
    opts = CheckOptions(out_dir=out_dir, mpp_out_um=args.mpp_out, tile_mpp_um=args.tile_mpp,
                        tile_args=tuple(shlex.split(args.tile_args)), score_args=tuple(shlex.split(args.score_args)),
                        criteria=args.criteria, annotations=args.annotations)
    images = read_labels(args.fixtures)[: args.limit]
    units = [(image, label, variant) for image, label in images for variant in args.variants]
    print(f"{len(images)} images x {len(args.variants)} variants x {len(args.criteria)} guidelines at "
          f"{opts.mpp_out_um:g} µm/px, tiled at {opts.tile_mpp:g} µm/px, with {' '.join(opts.command)}; work in {out_dir}",
          flush=True)
    print(HEADER, flush=True)
    rows = []
    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        for unit_rows in pool.map(lambda u: check_image(*u, opts), units):
            for row in unit_rows:
                print(format_row(row), flush=True)
            rows.extend(unit_rows)
    summaries = {f"{v}, {c}": summarise([r for r in rows if r["variant"] == v and r["criteria"] == c])
                 for v in args.variants for c in args.criteria}
    print()
    for name, s in summaries.items():
        print(format_summary(name, s))
    tma = check_tma([image for image, _ in images], rows, opts) if args.tma else None
    if tma is not None:
        print(format_tma(tma))
    return {"options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "rows": rows, "summaries": summaries, "tma": tma}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="real-stain-") as tmp:
        out_dir = args.out or Path(tmp)
        result = run_check(args, out_dir)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")  # the commands' torch threads, on a small machine
    raise SystemExit(main())
