"""Nuclei found by ``ihc_dab`` against nuclei counted by eye, mostly on pale counterstain.

``qc/nuclei_counts.csv`` holds nuclei counted by eye in 12 crops of 100 x 100 px of the real
HER2 IHC patches in ``../shared/fixtures/ihc_dev`` (ten on the palest counterstain; see
``qc/annotations/README.md``: each crop counted twice, +-20 %). Each patch is cut into 256 px
tiles and measured (``IhcDabScorer(mpp_um=1.0).measure_u8(tiles)["cells"]``); the nuclei whose
centres lie in a crop are counted and set against the eye count. Per crop it prints both counts,
their ratio and the density (nuclei per mm²); then the median ratio and the range.

Also per patch (``--tiles``): each tile's nuclei per mm² of tissue and the scorer's
``nuclear_density_low`` flag (cellular tissue with implausibly few nuclei found).

    python qc/nuclei_check.py [--fixtures DIR] [--counts qc/nuclei_counts.csv] [--tile-px 256] [--tiles]

Importable: :func:`crop_counts` returns the rows.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from tumour_agreement import DEFAULT_FIXTURES, image_cells, read_rgb, tiles_of  # noqa: E402

DEFAULT_COUNTS = HERE / "nuclei_counts.csv"


def read_counts(path: str | Path = DEFAULT_COUNTS) -> list[dict]:
    """The rows of ``nuclei_counts.csv`` with numbers parsed."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        for k in ("x0", "y0", "size_px"):
            r[k] = int(r[k])
        r["nuclei_by_eye"] = float(r["nuclei_by_eye"])
    return rows


def crop_counts(scorer, fixtures: Path = DEFAULT_FIXTURES, counts: Path = DEFAULT_COUNTS, *, tile_px: int = 256,
                mpp_um: float = 1.0) -> list[dict]:
    """Per crop of ``counts``: ``found`` (scorer's nuclei with centres inside), ``eye``, ``ratio``, ``per_mm2``."""
    rows = read_counts(counts)
    cache: dict[str, dict] = {}
    out = []
    for r in rows:
        if r["image"] not in cache:
            cache[r["image"]] = image_cells(read_rgb(fixtures / r["image"]), scorer, tile_px=tile_px)
        cells = cache[r["image"]]
        x0, y0, s = r["x0"], r["y0"], r["size_px"]
        inside = (cells["x_px"] >= x0) & (cells["x_px"] < x0 + s) & (cells["y_px"] >= y0) & (cells["y_px"] < y0 + s)
        found = int(inside.sum())
        area_mm2 = (s * mpp_um * 1e-3) ** 2
        out.append({**r, "found": found, "eye": r["nuclei_by_eye"], "ratio": found / r["nuclei_by_eye"],
                    "found_per_mm2": found / area_mm2, "eye_per_mm2": r["nuclei_by_eye"] / area_mm2})
    return out


def format_crops(rows: list[dict]) -> str:
    lines = [f"{'image':<18} {'x0':>4} {'y0':>4} {'tissue':<7} {'eye':>5} {'found':>5} {'ratio':>5} "
             f"{'eye/mm2':>7} {'found/mm2':>9}"]
    for r in rows:
        lines.append(f"{r['image']:<18} {r['x0']:>4} {r['y0']:>4} {r['tissue']:<7} {r['eye']:>5.1f} {r['found']:>5d} "
                     f"{r['ratio']:>5.2f} {r['eye_per_mm2']:>7.0f} {r['found_per_mm2']:>9.0f}")
    ratios = np.array([r["ratio"] for r in rows])
    lines.append(f"ratio found/eye: median {np.median(ratios):.2f}, range {ratios.min():.2f}-{ratios.max():.2f}; "
                 f"total {sum(r['found'] for r in rows)} found / {sum(r['eye'] for r in rows):.0f} by eye")
    return "\n".join(lines)


def tile_densities(scorer, fixtures: Path = DEFAULT_FIXTURES, *, tile_px: int = 256) -> list[dict]:
    """Per patch and tile: nuclei per mm² of tissue and the ``nuclear_density_low`` measurement (if the scorer has it)."""
    import torch

    out = []
    for image in sorted(fixtures.glob("*.jpg")):
        tiles, origins = tiles_of(read_rgb(image), tile_px)
        m = scorer.measure_u8(torch.from_numpy(tiles))
        area_mm2 = (tile_px * scorer.mpp_um * 1e-3) ** 2
        for i, (y, x) in enumerate(origins):
            tissue = float(m["tissue_fraction"][i])
            n = float(m["cell_count"][i])
            out.append({"image": image.stem, "y0": int(y), "x0": int(x), "tissue_fraction": tissue,
                        "nuclei": n, "per_mm2_tissue": n / max(tissue * area_mm2, 1e-9),
                        "low": float(m["nuclear_density_low"][i]) if "nuclear_density_low" in m else float("nan")})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fixtures", type=Path, default=DEFAULT_FIXTURES)
    ap.add_argument("--counts", type=Path, default=DEFAULT_COUNTS)
    ap.add_argument("--tile-px", type=int, default=256)
    ap.add_argument("--kernel", default="auto", choices=("auto", "opencv", "torch"))
    ap.add_argument("--tiles", action="store_true", help="also print every tile's nuclear density and low-density flag")
    args = ap.parse_args(argv)
    if not args.fixtures.is_dir():
        print(f"no fixtures at {args.fixtures}", file=sys.stderr)
        return 1
    from wsi_her2.models.ihc_score import IhcDabScorer

    scorer = IhcDabScorer(mpp_um=1.0, kernel=args.kernel)
    print(format_crops(crop_counts(scorer, args.fixtures, args.counts, tile_px=args.tile_px)))
    if args.tiles:
        print()
        print(f"{'image':<15} {'y0':>4} {'x0':>4} {'tissue':>6} {'nuclei':>6} {'/mm2 tissue':>11} {'low':>4}")
        for r in tile_densities(scorer, args.fixtures, tile_px=args.tile_px):
            print(f"{r['image']:<15} {r['y0']:>4} {r['x0']:>4} {r['tissue_fraction']:>6.2f} {r['nuclei']:>6.0f} "
                  f"{r['per_mm2_tissue']:>11.0f} {r['low']:>4.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
