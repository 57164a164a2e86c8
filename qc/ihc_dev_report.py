"""Run the default IHC scorer over the real ihc_dev patches and print a sanity table.

Each 1024 px JPEG (treated as 1.0 µm/px, see ``shared/fixtures/README.md``) is cut into
non-overlapping 224 px tiles at 1.0 µm/px (no resampling), every tile is scored by
:class:`wsi_her2.ihc_score.IhcDabScorer`, and the table shows per image: the source slide's
label, the fractions of tiles called 0/1+/2+/3+ (argmax, over the tiles with reliability
>= 0.5, i.e. those the QC stage would keep; column ``ok``), an image-level ASCO-style call
(3+ if >10 % of tiles are 3+, elif >10 % are >=2+ -> 2+, elif >10 % >=1+ -> 1+, else 0), and
tile means of DAB OD, membrane completeness and stained fraction. The last line gives the
Spearman rank correlation between the label and the image's ``her2_index`` (membrane
H-score / 100 over all its detected cells: tile indices weighted by cell count), and how many
image calls equal the label.

Labels are the *slide's* score, so disagreement on single patches is expected; this is a
sanity check of ranking, not a calibration target.

Usage::

    PYTHONPATH=. python qc/ihc_dev_report.py [--fixtures DIR] [--tile-px 224] [--mpp 1.0]
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy.stats import spearmanr

from wsi_her2.ihc_score import CLASS_NAMES, IhcDabScorer

DEFAULT_FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "ihc_dev"
LABEL_TO_INT = {name: i for i, name in enumerate(CLASS_NAMES)}


def image_call(tile_calls: np.ndarray, *, cut: float = 0.10) -> int:
    """ASCO-style image call from per-tile argmax calls (0-3): the >10 % decision list."""
    n = max(len(tile_calls), 1)
    for grade in (3, 2, 1):
        if (tile_calls >= grade).sum() / n > cut:
            return grade
    return 0


def tiles_of(path: Path, tile_px: int) -> torch.Tensor:
    """Non-overlapping ``tile_px`` tiles of an RGB image as ``(N, 3, tile_px, tile_px)`` in [0, 1]."""
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    h, w, _ = rgb.shape
    tiles = [
        rgb[y: y + tile_px, x: x + tile_px]
        for y in range(0, h - tile_px + 1, tile_px)
        for x in range(0, w - tile_px + 1, tile_px)
    ]
    return torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2).contiguous()


def score_image(
    scorer: IhcDabScorer, path: Path, tile_px: int, *, min_reliability: float = 0.5
) -> dict[str, float]:
    """Score one image's tiles; return its row of the report."""
    x = tiles_of(path, tile_px)
    m = scorer.measure(x)
    # Tiles the QC stage would drop (too few cells or too little tissue) carry no evidence.
    ok = (m["reliability"] >= min_reliability).numpy()
    calls = m["probs"].argmax(dim=1).numpy()[ok]
    n_ok = max(int(ok.sum()), 1)
    row: dict[str, float] = {
        f"f{name}": float((calls == i).sum() / n_ok) for i, name in enumerate(CLASS_NAMES)
    }
    row["call"] = image_call(calls)
    row["n_ok"] = float(ok.sum())
    row["n_tiles"] = float(len(ok))
    for key in ("dab_od_mean", "completeness", "stained_fraction", "cell_count"):
        row[key] = float(m[key].mean())
    # Continuous score: membrane H-score / 100 over all detected cells of the image, i.e. the
    # tile indices weighted by their cell counts (empty tiles do not dilute it).
    cells = m["cell_count"]
    row["her2_index"] = float((m["her2_index"] * cells).sum() / cells.sum().clamp(min=1.0))
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fixtures", type=Path, default=DEFAULT_FIXTURES)
    parser.add_argument("--tile-px", type=int, default=224)
    parser.add_argument("--mpp", type=float, default=1.0, help="pixel size of the images, µm/px")
    args = parser.parse_args(argv)

    labels_csv = args.fixtures / "labels.csv"
    if not labels_csv.is_file():
        print(f"no labels.csv under {args.fixtures}; pass --fixtures", file=sys.stderr)
        return 2
    with labels_csv.open(newline="") as fh:
        rows = list(csv.DictReader(fh))

    torch.set_num_threads(1)
    scorer = IhcDabScorer(mpp_um=args.mpp).eval()
    header = (
        f"{'image':<20} {'label':>5} {'f0':>5} {'f1+':>5} {'f2+':>5} {'f3+':>5} {'call':>4} "
        f"{'dabOD':>6} {'compl':>6} {'stain':>6} {'index':>6} {'cells':>6} {'ok':>5}"
    )
    print(header)
    labels, index, agree = [], [], 0
    for r in rows:
        label = LABEL_TO_INT[r["her2_score_of_source_slide"]]
        res = score_image(scorer, args.fixtures / r["image"], args.tile_px)
        labels.append(label)
        index.append(res["her2_index"])
        agree += int(res["call"] == label)
        print(
            f"{r['image']:<20} {CLASS_NAMES[label]:>5} {res['f0']:5.2f} {res['f1+']:5.2f} "
            f"{res['f2+']:5.2f} {res['f3+']:5.2f} {CLASS_NAMES[int(res['call'])]:>4} "
            f"{res['dab_od_mean']:6.3f} {res['completeness']:6.3f} {res['stained_fraction']:6.3f} "
            f"{res['her2_index']:6.3f} {res['cell_count']:6.1f} {int(res['n_ok']):2d}/{int(res['n_tiles'])}"
        )
    rho = spearmanr(labels, index).statistic
    print(
        f"summary: n={len(rows)} spearman(label, cell-weighted her2_index)={rho:.3f} "
        f"exact agreement={agree}/{len(rows)}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
