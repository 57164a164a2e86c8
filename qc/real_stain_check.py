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

Printed per slide: the source slide's label, the call, the HER2 category (where the scorer
reports one), the scored tumour area (mm²) and tumour cell count (where reported), tiles used
out of all tiles, and the rejected tiles counted per QC reason (from the ``qc_reason`` column
of ``<id>.tiles.parquet``). A failing command (e.g. "no tissue found") is a row with its
error. Then per variant: exact agreement over all images (no call counts as a miss), the
confusion matrix and quadratic-weighted kappa over the called slides
(:func:`wsi_her2.batch.report.agreement_report`), and the counts of "no tissue" failures,
other failures and indeterminate calls.

The labels are the *source slides'* scores, not the patches': this is a check of the whole
chain on real stain, never a target to tune thresholds to.

Usage::

    python qc/real_stain_check.py [--fixtures DIR] [--out DIR] [--variants full,core]
        [--mpp-out 1.0] [--tile-mpp M] [--workers 1] [--json FILE] [--limit N]
"""
from __future__ import annotations

import argparse
import csv
import json
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
from wsi_her2.synthetic.image_slide import (
    LAVENDER_GLASS_RGB,
    composite_on_glass,
    resample_to_mpp,
    write_image_slide,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_FIXTURES = REPO_ROOT.parent / "shared" / "fixtures" / "ihc_dev"
#: Pixel size of the dev patches (``shared/fixtures/README.md``: treat them as 1.0 µm/px).
SOURCE_MPP_UM = 1.0
VARIANTS = ("full", "core", "rect")
DEFAULT_VARIANTS = ("full", "core")
GLASS_MARGIN_PX = 64
LABEL_COLUMN = "her2_score_of_source_slide"


@dataclass(frozen=True)
class CheckOptions:
    """How each image becomes a slide and how the command line is run on it."""

    out_dir: Path
    mpp_out_um: float = SOURCE_MPP_UM
    tile_mpp_um: float | None = None  # None: tile at the slide's own pixel size
    glass_rgb: tuple[int, int, int] = LAVENDER_GLASS_RGB
    tile_args: tuple[str, ...] = ()
    score_args: tuple[str, ...] = ()
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


def make_slide(image: Path, variant: str, opts: CheckOptions) -> Path:
    """Write ``image`` as the ``variant`` slide at ``opts.mpp_out_um``; returns its path."""
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r} is unknown; use one of {VARIANTS}")
    rgb = np.asarray(Image.open(image).convert("RGB"))
    rgb = resample_to_mpp(rgb, SOURCE_MPP_UM, opts.mpp_out_um)
    if variant != "full":
        margin_px = round(GLASS_MARGIN_PX * SOURCE_MPP_UM / opts.mpp_out_um)
        # Re-lit from the patch's own bright end (its glass, or its palest tissue when it has none)
        # to the tinted glass, keeping optical density: pale tissue lands a few levels below glass.
        src_glass = tuple(float(v) for v in np.percentile(rgb.reshape(-1, 3), 99.5, axis=0))
        rgb = composite_on_glass(rgb, glass_rgb=opts.glass_rgb, shape="core" if variant == "core" else "rect",
                                 margin_px=margin_px, seed=0, relight_from_rgb=src_glass)
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


def check_image(image: Path, label: str, variant: str, opts: CheckOptions) -> dict:
    """One image as one slide variant through ``wsi-her2 tile`` and ``wsi-her2 score``.

    Returns the table row; a failing step gives a row whose ``error`` says which step failed
    and why (the command's own error line), never an exception.
    """
    started = time.perf_counter()
    sid = slide_id(image, variant, opts.mpp_out_um)
    row: dict = {"image": image.name, "variant": variant, "slide": sid, "label": label, "call": None,
                 "category": None, "tumour_area_mm2": None, "tumour_cells": None, "tiles_used": None,
                 "tiles_total": None, "rejected": {}, "reason": None, "error": None}
    run_dir = opts.out_dir / "runs" / sid  # one directory per slide: parallel runs never share slides.csv
    try:
        slide = make_slide(image, variant, opts)
        tile = _run(["tile", str(slide), "-o", str(run_dir), "--mpp", f"{opts.tile_mpp:g}", "-q",
                     *opts.tile_args], opts)
        if tile.returncode != 0:
            row["error"] = _error_line(tile, "tile", slide)
        else:
            store = run_dir / f"{sid}.zarr"
            score = _run(["score", str(store), "-q", *opts.score_args], opts)
            if score.returncode != 0:
                row["error"] = _error_line(score, "score", store)
            else:
                row.update(read_outputs(run_dir, sid))
    except subprocess.TimeoutExpired as exc:
        row["error"] = f"timeout after {exc.timeout:.0f} s"
    except (OSError, ValueError, KeyError) as exc:  # unreadable image or outputs: a row, not a crash
        row["error"] = f"{type(exc).__name__}: {exc}"
    row["seconds"] = round(time.perf_counter() - started, 1)
    return row


def _fmt(value: object, spec: str = "") -> str:
    if value is None:
        return "-"
    return format(value, spec) if spec else str(value)


def format_row(row: dict) -> str:
    used = f"{_fmt(row['tiles_used'])}/{_fmt(row['tiles_total'])}"
    rejected = " ".join(f"{k}:{v}" for k, v in row["rejected"].items()) or "-"
    tail = f"ERROR {row['error']}" if row["error"] else rejected
    return (f"{row['image']:<20} {row['variant']:<7} {row['label']:>5} {_fmt(row['call']):>13} "
            f"{_fmt(row['category']):>14} {_fmt(row['tumour_area_mm2'], '.3f'):>8} "
            f"{_fmt(row['tumour_cells']):>6} {used:>7}  {tail}")


HEADER = (f"{'image':<20} {'variant':<7} {'label':>5} {'call':>13} {'category':>14} {'tum_mm2':>8} "
          f"{'cells':>6} {'used':>7}  rejected tiles by reason / error")


def summarise(rows: list[dict]) -> dict:
    """Agreement of one variant's rows with their labels, and the failure counts."""
    report = agreement_report([
        {"slide": r["slide"], "label": r["label"], "her2_score": r["call"],
         "status": "done" if r["error"] is None else "failed"} for r in rows
    ])
    return {
        "n": len(rows),
        "exact": sum(r["call"] == r["label"] for r in rows),
        "no_tissue": sum("no tissue" in (r["error"] or "") for r in rows),
        "other_failures": sum(bool(r["error"]) and "no tissue" not in r["error"] for r in rows),
        "indeterminate": sum(r["call"] == "indeterminate" for r in rows),
        "agreement": report,
    }


def format_summary(variant: str, s: dict) -> str:
    kappa = (s["agreement"] or {}).get("quadratic_weighted_kappa")
    n_called = (s["agreement"] or {}).get("n_compared", 0)
    lines = [(
        f"[{variant}] exact agreement {s['exact']}/{s['n']} over all images (no call = miss); "
        f"quadratic-weighted kappa {'n/a' if kappa is None else f'{kappa:.3f}'} over {n_called} called slides; "
        f"no tissue {s['no_tissue']}, other failures {s['other_failures']}, indeterminate {s['indeterminate']}"
    )]
    if n_called:
        lines.append(format_agreement({**s["agreement"], "not_scored": []}))  # the table lists them
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fixtures", type=Path, default=DEFAULT_FIXTURES, help="folder with labels.csv and the images")
    p.add_argument("--out", type=Path, default=None, help="working folder for slides and outputs (default: a temporary one)")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--mpp-out", type=float, default=SOURCE_MPP_UM, help="slide pixel size, µm/px (resampled from 1.0)")
    p.add_argument("--tile-mpp", type=float, default=None, help="wsi-her2 tile --mpp (default: --mpp-out)")
    p.add_argument("--workers", type=int, default=1, help="slides processed at once (each runs its own commands)")
    p.add_argument("--tile-args", default="", help="extra options for wsi-her2 tile, e.g. '--min-tissue 0.2'")
    p.add_argument("--score-args", default="", help="extra options for wsi-her2 score")
    p.add_argument("--limit", type=int, default=None, help="only the first N images")
    p.add_argument("--json", type=Path, default=None, help="also save rows and summaries as JSON here")
    args = p.parse_args(argv)
    args.variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad or not args.variants:
        p.error(f"--variants {','.join(bad) or '(none)'}: choose from {', '.join(VARIANTS)}")
    if not 0.05 <= args.mpp_out <= 20 or args.workers < 1:
        p.error("--mpp-out must lie within 0.05-20 µm/px and --workers be >= 1")
    if not (args.fixtures / "labels.csv").is_file():
        p.error(f"no labels.csv under {args.fixtures}; pass --fixtures")
    return args


def run_check(args: argparse.Namespace, out_dir: Path) -> dict:
    opts = CheckOptions(out_dir=out_dir, mpp_out_um=args.mpp_out, tile_mpp_um=args.tile_mpp,
                        tile_args=tuple(shlex.split(args.tile_args)), score_args=tuple(shlex.split(args.score_args)))
    images = read_labels(args.fixtures)[: args.limit]
    units = [(image, label, variant) for image, label in images for variant in args.variants]
    print(f"{len(images)} images x {len(args.variants)} variants at {opts.mpp_out_um:g} µm/px, tiled at "
          f"{opts.tile_mpp:g} µm/px, with {' '.join(opts.command)}; work in {out_dir}", flush=True)
    print(HEADER, flush=True)
    rows = []
    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        for row in pool.map(lambda u: check_image(*u, opts), units):
            print(format_row(row), flush=True)
            rows.append(row)
    summaries = {v: summarise([r for r in rows if r["variant"] == v]) for v in args.variants}
    print()
    for variant, s in summaries.items():
        print(format_summary(variant, s))
    return {"options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "rows": rows, "summaries": summaries}


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
