"""The HER2 vocabulary, defined once and importable without torch: scores, label spellings, colours.

Every stage (models, scoring, outputs, cohorts, training, calibration) reads these names; a
model's class order is ``HER2_CLASSES`` (column ``k`` of a probability array is score ``k``).
"""
from __future__ import annotations

import re

from wsi_her2.errors import ConfigError

#: HER2 IHC scores, in increasing order.
HER2_CLASSES: tuple[str, ...] = ("0", "1+", "2+", "3+")
#: Score given when a slide (or region, or core) cannot be called.
INDETERMINATE = "indeterminate"

#: The stain a DAB membrane scorer measures (its ``stain`` capability): brown DAB on a blue hematoxylin
#: counterstain; the stain check refuses other slides for it (:mod:`wsi_her2.stain.check`).
DAB_IHC = "dab_ihc"

#: How the DAB scorer weighs a nucleus as tumour (``--tumour-model``): the trained epithelium
#: detector (opt-in) or the cohesion rule (the default: 4-24 other nuclei in a 40 µm square).
TUMOUR_MODELS: tuple[str, ...] = ("epithelium", "cohesion")

#: Membrane pattern of a cell, from the least to the most stained ring (a cell's ``pattern`` code
#: is the index). ``lateral``: two opposite sides; ``basolateral``: a U, all but the luminal side.
PATTERNS: tuple[str, ...] = ("none", "partial", "lateral", "basolateral", "complete")
#: Columns of a scored cell (the scorer's per-cell table, ``<id>.cells.parquet``): its tile, its
#: centre in tile pixels, tumour weight, the share of its ring inside the tile (cells cut by the
#: tile edge are not graded), membrane OD (as the 1 µm reference band would have it) and
#: completeness, pattern and grade codes (grade 0-3), and the grade memberships.
CELL_COLUMNS: tuple[str, ...] = ("tile", "y_px", "x_px", "tumour_weight", "ring_in_tile", "membrane_od", "completeness",
                                 "pattern", "grade", "p_ge1", "p_ge2", "p_3")

#: QuPath class names and colours (Okabe-Ito, distinguishable with the common colour-vision
#: deficiencies; blue -> green -> orange -> vermillion follows the score upwards).
QC_REJECTED = "QC rejected"
HER2_INDETERMINATE = f"HER2 {INDETERMINATE}"
CLASS_COLORS: dict[str, tuple[int, int, int]] = {
    "HER2 0": (0, 114, 178),
    "HER2 1+": (0, 158, 115),
    "HER2 2+": (230, 159, 0),
    "HER2 3+": (213, 94, 0),
    QC_REJECTED: (128, 128, 128),
    HER2_INDETERMINATE: (204, 121, 167),
}

_EMPTY = {"", "NA", "N/A", "NAN", "NONE"}


def parse_her2_label(value: object, *, where: str = "") -> str | None:
    """One of :data:`HER2_CLASSES` from any common spelling, ``None`` for an empty cell.

    Accepted: ``3``, ``"3"``, ``"3+"``, ``"3.0"``, ``"3plus"``, ``"HER2_3+"``, ``"HER2: 2+"``,
    ``"score 2+"``, ``" 2+ "``, ``"0+"``. Anything else is a :class:`ConfigError` naming ``where``.
    """
    if value is None:
        return None
    text = str(value).strip()
    if text.upper() in _EMPTY:
        return None
    t = re.sub(r"^(her2|score)[\s_\-:]*", "", text.lower()).replace("plus", "+").replace(" ", "")
    t = t[:-2] if t.endswith(".0") else t
    m = re.fullmatch(r"([0-3])\+?", t)
    if m is None:
        raise ConfigError(f"{where}label {value!r} is not a HER2 score; use 0, 1+, 2+ or 3+ (or leave it empty)")
    return HER2_CLASSES[int(m.group(1))]
