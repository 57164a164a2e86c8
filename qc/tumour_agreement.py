"""Does ``ihc_dab`` count tumour epithelium? Its per-cell tumour weights against drawn annotations.

For each real HER2 IHC patch of ``../shared/fixtures/ihc_dev`` (1024 px JPEGs, ~1.0 µm/px) the
scorer's cells (``IhcDabScorer.measure_u8(tiles)["cells"]``, the patch cut into 256 px tiles,
tile-local pixels mapped back to the patch) are set against ``qc/annotations/<stem>.geojson``
(``Tumor``, ``Benign epithelium``, ``Ignore`` polygons drawn by eye; see its README):

- **precision**: the share of counted tumour cells (the sum of the weights) that lies inside
  ``Tumor`` polygons. Cells inside ``Ignore`` are left out of both sums; cells inside
  ``Benign epithelium`` count as outside, and the share of the weight that lands there is
  reported on its own (``benign``);
- **recall**: the share of the nuclei found inside ``Tumor`` polygons that are counted as
  tumour (the sum of their weights over their number).

Targets: precision >= 0.90 and recall >= 0.80, pooled over the 20 patches and per patch. On the
region-level outlines (00000, 00002, 00007, 00012, 00015, 00018: ``Tumor`` includes the fine
stroma between tumour cells) recall is bounded below 1 by design, since the stroma nuclei
inside those polygons are rightly not counted.

Run as a script it prints one row per patch, then the pooled numbers, for each tumour model of
the scorer (``--models``, default ``cohesion,epithelium``: the cohesion rule first, the "before",
then the epithelium detector), side by side::

    python qc/tumour_agreement.py [--fixtures DIR] [--annotations DIR] [--tile-px 256]
        [--models cohesion,epithelium] [--kernel opencv]

The epithelium detector was trained on these annotations (``qc/train_epithelium.py``), so its
numbers here are in sample; that script prints the held-out (leave-one-image-out) ones.

Importable: :func:`agreement` (cells against one annotation), :func:`image_cells` (the scorer's
cells of one patch in patch pixels), :func:`read_annotation`.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

HERE = Path(__file__).resolve().parent
DEFAULT_FIXTURES = HERE.parents[1] / "shared" / "fixtures" / "ihc_dev"
DEFAULT_ANNOTATIONS = HERE / "annotations"

#: Region codes of :func:`classify_points`.
OUTSIDE, TUMOUR, BENIGN, IGNORE = 0, 1, 2, 3
_CLASS_CODES = {"Tumor": TUMOUR, "Benign epithelium": BENIGN, "Ignore": IGNORE}


@dataclass(frozen=True)
class Annotation:
    """The union of each class's polygons of one patch (shapely geometries; empty when absent)."""

    tumour: object
    benign: object
    ignore: object


def read_annotation(path: str | Path) -> Annotation:
    """The ``Tumor``, ``Benign epithelium`` and ``Ignore`` polygons of a QuPath GeoJSON file."""
    import shapely
    from shapely.geometry import shape

    parts: dict[int, list] = {TUMOUR: [], BENIGN: [], IGNORE: []}
    data = json.loads(Path(path).read_text())
    features = data["features"] if isinstance(data, dict) and "features" in data else data
    for feature in features:
        cls = (feature.get("properties") or {}).get("classification") or {}
        name = cls.get("name") if isinstance(cls, dict) else cls
        code = _CLASS_CODES.get(name)
        if code is None:
            raise ValueError(f"{path}: unknown class {name!r}; expected one of {sorted(_CLASS_CODES)}.")
        parts[code].append(shape(feature["geometry"]))

    def union(geoms: list):
        return shapely.union_all(geoms) if geoms else shapely.Polygon()

    return Annotation(tumour=union(parts[TUMOUR]), benign=union(parts[BENIGN]), ignore=union(parts[IGNORE]))


def classify_points(x_px: NDArray, y_px: NDArray, annotation: Annotation) -> NDArray[np.uint8]:
    """Per point (patch pixels, x right, y down): :data:`TUMOUR`, :data:`BENIGN`, :data:`IGNORE` or :data:`OUTSIDE`.

    The polygons do not overlap (see the annotations' README); ``Ignore`` wins should they.
    """
    import shapely

    x = np.asarray(x_px, np.float64)
    y = np.asarray(y_px, np.float64)
    code = np.full(x.shape, OUTSIDE, np.uint8)
    for geom, value in ((annotation.tumour, TUMOUR), (annotation.benign, BENIGN), (annotation.ignore, IGNORE)):
        if not geom.is_empty:
            code[shapely.contains_xy(geom, x, y)] = value
    return code


@dataclass
class Agreement:
    """Cells of one patch (or pooled) against the annotation: sums, then the ratios."""

    counted: float = 0.0  # sum of tumour weights outside Ignore
    counted_in_tumour: float = 0.0  # ... of cells inside Tumor
    counted_in_benign: float = 0.0  # ... of cells inside Benign epithelium
    nuclei_in_tumour: int = 0  # nuclei found inside Tumor
    nuclei: int = 0  # nuclei found outside Ignore

    def __add__(self, other: "Agreement") -> "Agreement":
        return Agreement(*(a + b for a, b in zip(self.astuple(), other.astuple())))

    def astuple(self) -> tuple:
        return (self.counted, self.counted_in_tumour, self.counted_in_benign, self.nuclei_in_tumour, self.nuclei)

    @property
    def precision(self) -> float:
        """Share of the counted tumour weight inside ``Tumor`` (nan when nothing is counted)."""
        return self.counted_in_tumour / self.counted if self.counted > 0 else float("nan")

    @property
    def recall(self) -> float:
        """Share of the nuclei inside ``Tumor`` counted as tumour (nan when there are none)."""
        return self.counted_in_tumour / self.nuclei_in_tumour if self.nuclei_in_tumour else float("nan")

    @property
    def benign_share(self) -> float:
        """Share of the counted tumour weight inside ``Benign epithelium``."""
        return self.counted_in_benign / self.counted if self.counted > 0 else float("nan")


def agreement(x_px: NDArray, y_px: NDArray, weight: NDArray, annotation: Annotation) -> Agreement:
    """Tumour weights of cells at ``(x_px, y_px)`` (patch pixels) against one patch's annotation."""
    w = np.asarray(weight, np.float64)
    code = classify_points(x_px, y_px, annotation)
    keep = code != IGNORE
    return Agreement(
        counted=float(w[keep].sum()),
        counted_in_tumour=float(w[code == TUMOUR].sum()),
        counted_in_benign=float(w[code == BENIGN].sum()),
        nuclei_in_tumour=int((code == TUMOUR).sum()),
        nuclei=int(keep.sum()),
    )


def tiles_of(rgb: NDArray[np.uint8], tile_px: int) -> tuple[NDArray[np.uint8], NDArray[np.int64]]:
    """``(B, tile_px, tile_px, 3)`` tiles of an image (whole tiles only) and each one's ``(y0, x0)``."""
    h, w = rgb.shape[:2]
    origins = np.array([(y, x) for y in range(0, h - tile_px + 1, tile_px) for x in range(0, w - tile_px + 1, tile_px)],
                       np.int64)
    tiles = np.stack([rgb[y: y + tile_px, x: x + tile_px] for y, x in origins])
    return np.ascontiguousarray(tiles), origins


def image_cells(rgb: NDArray[np.uint8], scorer, *, tile_px: int = 256) -> dict[str, NDArray]:
    """The scorer's per-cell table of one image cut into ``tile_px`` tiles, with ``x_px``/``y_px``
    in image pixels (numpy arrays; the other columns as the scorer gives them)."""
    import torch

    tiles, origins = tiles_of(rgb, tile_px)
    cells = scorer.measure_u8(torch.from_numpy(tiles))["cells"]
    out = {k: v.numpy() for k, v in cells.items()}
    tile = out["tile"].astype(np.int64)
    out["y_px"] = out["y_px"].astype(np.float64) + origins[tile, 0]
    out["x_px"] = out["x_px"].astype(np.float64) + origins[tile, 1]
    return out


def read_rgb(path: str | Path) -> NDArray[np.uint8]:
    import cv2

    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise FileNotFoundError(f"cannot read image {path}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def dev_images(fixtures: Path, annotations: Path) -> list[tuple[str, Path, Path]]:
    """``(stem, image, annotation)`` of every dev patch that has an annotation file."""
    out = []
    for image in sorted(fixtures.glob("*.jpg")):
        ann = annotations / f"{image.stem}.geojson"
        if ann.is_file():
            out.append((image.stem, image, ann))
    return out


def evaluate(scorer, fixtures: Path = DEFAULT_FIXTURES, annotations: Path = DEFAULT_ANNOTATIONS, *,
             tile_px: int = 256) -> dict[str, Agreement]:
    """Per patch :class:`Agreement` of ``scorer``'s tumour weights (and ``"pooled"``)."""
    rows: dict[str, Agreement] = {}
    for stem, image, ann in dev_images(fixtures, annotations):
        cells = image_cells(read_rgb(image), scorer, tile_px=tile_px)
        rows[stem] = agreement(cells["x_px"], cells["y_px"], cells["tumour_weight"], read_annotation(ann))
    rows["pooled"] = sum(rows.values(), Agreement())
    return rows


def _fmt(v: float) -> str:
    return "   -" if v != v else f"{v:4.2f}"


def format_table(results: dict[str, dict[str, Agreement]]) -> str:
    """One row per patch: per model, counted tumour weight, precision, recall, benign share."""
    models = list(results)
    head = f"{'image':<15} {'nuclei':>6} {'in Tumor':>8}"
    for m in models:
        head += f" | {m[:10]:>10}: {'counted':>7} {'prec':>4} {'rec':>4} {'benign':>6}"
    lines = [head, "-" * len(head)]
    for stem in results[models[0]]:
        first = results[models[0]][stem]
        line = f"{stem:<15} {first.nuclei:>6d} {first.nuclei_in_tumour:>8d}"
        for m in models:
            a = results[m][stem]
            line += f" | {'':>10}  {a.counted:>7.0f} {_fmt(a.precision)} {_fmt(a.recall)} {_fmt(a.benign_share):>6}"
        if stem == "pooled":
            lines.append("-" * len(head))
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fixtures", type=Path, default=DEFAULT_FIXTURES)
    ap.add_argument("--annotations", type=Path, default=DEFAULT_ANNOTATIONS)
    ap.add_argument("--tile-px", type=int, default=256)
    ap.add_argument("--mpp", type=float, default=1.0, help="the patches' µm/px (default 1.0)")
    ap.add_argument("--models", default="cohesion,epithelium",
                    help="tumour models of the scorer to compare (IhcDabScorer tumour_model), comma-separated")
    ap.add_argument("--kernel", default="auto", choices=("auto", "opencv", "torch"))
    args = ap.parse_args(argv)
    if not args.fixtures.is_dir():
        print(f"no fixtures at {args.fixtures}", file=sys.stderr)
        return 1
    from wsi_her2.models.ihc_score import IhcDabScorer

    results = {}
    for model in [m.strip() for m in args.models.split(",") if m.strip()]:
        try:
            scorer = IhcDabScorer(mpp_um=args.mpp, kernel=args.kernel, tumour_model=model)
        except TypeError:  # a scorer from before tumour models: its one rule
            scorer = IhcDabScorer(mpp_um=args.mpp, kernel=args.kernel)
        results[model] = evaluate(scorer, args.fixtures, args.annotations, tile_px=args.tile_px)
    print(format_table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
