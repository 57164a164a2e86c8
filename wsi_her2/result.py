"""The result of scoring a slide: what ``score_store`` returns and every output file is written from.

:class:`SlideResult` holds the slide's call (:class:`PartCall`: score, HER2 category, criteria, the
tumour-cell percentages behind it), the scored tumour (:class:`Tumour`), the QC summary, the calls
of its TMA cores or regions (:class:`Groups` of :class:`Part`), timings and provenance
(:class:`Provenance`), the paths of the files written from it, and, for the writers, the per-tile
results (:class:`TileResults`: tile calls, QC reasons, measurements, cells, saliency).

``<id>.json`` is :meth:`SlideResult.to_record` (schema :data:`SCHEMA_VERSION`, its keys in the
README's table) plus the files' digests that :mod:`wsi_her2.outputs.manifest` adds;
:meth:`SlideResult.from_record` reads one back (a slide scored earlier). The ``slides.csv`` row
and the ``cores.csv`` / ``regions.csv`` rows are :attr:`SlideResult.row` and :meth:`Part.row`.

Torch-free and free of the score stage: the writers (:mod:`wsi_her2.outputs`) import this module,
never :mod:`wsi_her2.score`. Results are frozen: their mappings are read-only (:class:`FrozenDict`),
their lists tuples, their arrays not writeable.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from wsi_her2.vocab import HER2_CLASSES

__all__ = [
    "BLANK", "CALL_COLUMNS", "MISSING", "NOT_CALLED", "PART_CSV_COLUMNS", "SCHEMA_VERSION", "SCORED", "SLIDES_CSV_COLUMNS",
    "Cells", "FrozenDict", "Groups", "Part", "PartCall", "Provenance", "Saliency", "SlideResult", "TileResults", "Tumour",
]

#: Version of ``<id>.json``'s layout (the ``schema_version`` key). 1: the first versioned layout (the keys of
#: 0.2.0, whose records carry no ``schema_version`` and read as version 0, with the same keys).
SCHEMA_VERSION = 1

SLIDES_CSV_COLUMNS = [
    "slide", "her2_score", "confidence", "frac_0", "frac_1+", "frac_2+", "frac_3+",
    "tiles_used", "tiles_rejected", "model", "aggregation", "her2_category", "tumour_cells", "tumour_area_mm2",
    "criteria", "specimen",
]
#: The columns of a part's row that come from its call (:meth:`PartCall.columns`).
CALL_COLUMNS = [
    "her2_score", "confidence", "frac_0", "frac_1+", "frac_2+", "frac_3+", "her2_category", "tumour_cells",
    "at_least_1+", "at_least_2+", "at_least_3+", "largest_cluster", "criteria", "specimen",
]
PART_CSV_COLUMNS = [
    "slide", "name", "status", "her2_score", "confidence", "frac_0", "frac_1+", "frac_2+", "frac_3+",
    "tiles_used", "tiles_rejected", "area_mm2", "row", "col", "x_level0", "y_level0", "note",
    "her2_category", "tumour_cells", "at_least_1+", "at_least_2+", "at_least_3+", "largest_cluster",
    "criteria", "specimen",
]
#: Status of a called part.
SCORED = "scored"
#: Status of a part with no usable tile (every tile refused by QC): reported, not called.
BLANK = "blank"
#: Status of a part whose call is indeterminate (its reason in the note): reported, not called.
NOT_CALLED = "not called"
#: Status of a TMA grid position without tissue: reported, never called.
MISSING = "missing"
_AT_LEAST = (">=1+", ">=2+", ">=3+")


class FrozenDict(dict):
    """A read-only dict (``json.dumps`` and pickle take it as a dict)."""

    def _read_only(self, *_args: Any, **_kwargs: Any) -> None:
        raise TypeError("a result's mappings are read-only; build a new result with dataclasses.replace")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = __ior__ = _read_only  # type: ignore[assignment]

    def __reduce__(self) -> tuple:
        return FrozenDict, (dict(self),)


def frozen(value: Any) -> Any:
    """``value`` made read-only all the way down: mappings as :class:`FrozenDict`, lists as tuples."""
    if isinstance(value, Mapping):
        return FrozenDict({k: frozen(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(frozen(v) for v in value)
    return value


def _plain(value: Any) -> Any:
    """A frozen value as plain JSON-ready Python (dicts, lists). Not :func:`wsi_her2.jsonable.to_jsonable`:
    the result types import nothing of the package but its vocabulary (``tests/test_import_graph.py``)."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def _freeze_fields(obj: Any, *names: str) -> None:
    for name in names:
        object.__setattr__(obj, name, frozen(getattr(obj, name)))


@dataclass(frozen=True)
class PartCall:
    """The call of some tiles (a slide, a TMA core, a region) and what it rests on.

    ``details`` holds what the rule compared (for a cell-level call: ``unit``, ``tumour_cells``,
    ``fraction_at_least`` (the tumour-cell percentages), ``thresholds``, ``passed``; a cluster call:
    ``largest_cluster``; an indeterminate one: ``reason``); ``criteria`` is the guideline and specimen rule
    (:meth:`wsi_her2.criteria.ScoringRule.to_dict`)."""

    her2_score: str
    confidence: float
    class_fractions: Mapping[str, float]
    n_tiles_used: int
    method: str
    details: Mapping[str, Any]
    her2_category: str
    her2_category_text: str
    criteria: Mapping[str, Any]

    def __post_init__(self) -> None:
        _freeze_fields(self, "class_fractions", "details", "criteria")

    @property
    def percentages(self) -> Mapping[str, float] | None:
        """Share of tumour cells at least 1+, 2+, 3+ (``{">=1+": f, ...}``), when the call counts cells."""
        return self.details.get("fraction_at_least")

    @property
    def reason(self) -> str | None:
        """Why the call is indeterminate (None otherwise)."""
        return self.details.get("reason")

    def to_dict(self) -> dict:
        """The call as ``<id>.json`` records it."""
        return _plain({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PartCall:
        """A recorded call; keys a record of an older version lacks are empty (a score it always has)."""
        empty = {"confidence": 0.0, "class_fractions": {}, "n_tiles_used": 0, "method": "", "details": {},
                 "her2_category": "", "her2_category_text": "", "criteria": {}}
        return cls(**{f.name: d[f.name] if f.name in d else empty[f.name] for f in dataclasses.fields(cls)})

    def columns(self) -> dict:
        """The columns of a part's row that come from its call (:data:`CALL_COLUMNS`): score, confidence,
        fractions, the tumour-cell percentages and clusters behind it, the criteria."""
        at_least = self.details.get("fraction_at_least", {})
        clusters = self.details.get("largest_cluster")
        return {
            "her2_score": self.her2_score, "confidence": round(float(self.confidence), 4),
            **{f"frac_{c}": round(float(self.class_fractions.get(c, 0.0)), 4) for c in HER2_CLASSES},
            "her2_category": self.her2_category, "tumour_cells": self.details.get("tumour_cells", ""),
            **{f"at_least_{k}": round(float(at_least[f">={k}"]), 4) if f">={k}" in at_least else "" for k in ("1+", "2+", "3+")},
            "largest_cluster": " ".join(f"{k.removeprefix('>=')}:{v}" for k, v in clusters.items()) if clusters else "",
            "criteria": self.criteria.get("criteria", ""), "specimen": self.criteria.get("specimen", ""),
        }


@dataclass(frozen=True)
class Tumour:
    """The scored tumour over the QC-passed tiles, by a scorer that counts cells."""

    cells: int
    area_mm2: float
    all_cells: int  # every nucleus found: the tumour share is cells / all_cells
    rule: str
    tiles_few_nuclei: int = 0  # tissue tiles with implausibly few nuclei (nuclear_density_low > 0.5)
    warning: str | None = None  # said when they are more than a tenth of the scored tiles

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Part:
    """One TMA core or region: its row in ``cores.csv`` / ``regions.csv`` and, when called, its call.

    ``status``: ``scored`` (called), ``not called`` (an indeterminate call, its reason in ``note``), ``blank``
    (no usable tile) or ``missing`` (a TMA grid position without tissue). ``columns``: the columns of its
    row that come from its call (:meth:`PartCall.columns`; score blank when not called).
    ``call`` and ``geometry`` (a shapely polygon in level-0 px of the slide file) are not in ``<id>.json``:
    a part read back from it has neither."""

    name: str
    status: str
    columns: Mapping[str, Any]
    tiles_used: int = 0
    tiles_rejected: int | None = None
    area_mm2: float | None = None
    x_level0: float | None = None
    y_level0: float | None = None
    note: str = ""
    grid: tuple[int, int] | None = None
    call: PartCall | None = field(default=None, compare=False)
    geometry: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        _freeze_fields(self, "columns")

    @property
    def called(self) -> bool:
        return self.status == SCORED

    def row(self) -> dict:
        """The part's row (``<id>.json`` and the parts' CSV, without the ``slide`` column)."""
        grid = {} if self.grid is None else {"row": self.grid[0], "col": self.grid[1]}
        if self.status == MISSING:
            return {"her2_score": "", "confidence": "", "tiles_used": self.tiles_used, "name": self.name, "status": self.status,
                    **grid, "x_level0": self.x_level0, "y_level0": self.y_level0, "note": self.note}
        return {"name": self.name, "status": self.status, "tiles_used": self.tiles_used, "tiles_rejected": self.tiles_rejected,
                "area_mm2": self.area_mm2, "x_level0": self.x_level0, "y_level0": self.y_level0, "note": self.note,
                **_plain(self.columns), **grid}

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Part:
        grid = (row["row"], row["col"]) if "row" in row and "col" in row else None
        return cls(name=row["name"], status=row["status"], columns={k: row[k] for k in CALL_COLUMNS if k in row},
                   tiles_used=row.get("tiles_used", 0), tiles_rejected=row.get("tiles_rejected"),
                   area_mm2=row.get("area_mm2"), x_level0=row.get("x_level0"), y_level0=row.get("y_level0"),
                   note=row.get("note", ""), grid=grid)


@dataclass(frozen=True)
class Groups:
    """The parts of a slide scored one by one: its TMA cores (``kind`` ``"core"``) or regions (``"region"``)."""

    kind: str
    parts: tuple[Part, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "parts", tuple(self.parts))

    @property
    def key(self) -> str:
        """Their key in ``<id>.json`` and the stem of their table: ``cores`` / ``regions``."""
        return f"{self.kind}s"


@dataclass(frozen=True)
class Cells:
    """The scored cells: the scorer's per-cell columns (:data:`wsi_her2.vocab.CELL_COLUMNS`) and each
    cell's centre in level-0 px of the slide file."""

    columns: Mapping[str, NDArray]
    xy_level0: NDArray[np.float64]

    def __post_init__(self) -> None:
        object.__setattr__(self, "columns", FrozenDict({k: _read_only(v) for k, v in self.columns.items()}))
        object.__setattr__(self, "xy_level0", _read_only(self.xy_level0))

    def __len__(self) -> int:
        return int(self.xy_level0.shape[0])

    def __getitem__(self, name: str) -> NDArray:
        return self.columns[name]


@dataclass(frozen=True)
class Saliency:
    """Grad-CAM(++) maps ``(n, g, g)`` in [0, 1] of the store tiles ``tiles``."""

    maps: NDArray[np.float32]
    tiles: NDArray[np.int64]


@dataclass(frozen=True)
class TileResults:
    """Per tile, indexed like the store's tiles: the call (index into ``classes``, -1: not scored), the
    reason it was not scored (QC, or outside the regions), every measurement (class probabilities, QC
    values, the scorer's own); the scored cells and the saliency maps when asked for."""

    classes: tuple[str, ...]
    calls: NDArray[np.int64]
    reasons: tuple[str | None, ...]
    measurements: Mapping[str, NDArray]
    cells: Cells | None = None
    saliency: Saliency | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(self.classes))
        object.__setattr__(self, "reasons", tuple(self.reasons))
        object.__setattr__(self, "calls", _read_only(self.calls))
        object.__setattr__(self, "measurements", FrozenDict({k: _read_only(v) for k, v in self.measurements.items()}))


def _read_only(array: Any) -> NDArray:
    out = np.asarray(array).view()
    out.flags.writeable = False
    return out


@dataclass(frozen=True)
class Provenance:
    """How the result was reached: model (its label, config, weights), slide rule, software version,
    the store and slide it came from, tile size, lab calibration, inference settings and the scope
    (``<id>.json``'s ``parts``: regions file and class, TMA, criteria, specimen, cells: a change re-scores)."""

    model: str
    aggregation: str
    package_version: str
    model_config: Mapping[str, Any] | None = None
    weights: str | None = None
    store: str | None = None
    slide_sha256: str | None = None
    slide_path: str | None = None
    tile_mpp_um: float | None = None
    tile_px: int | None = None
    calibration: Mapping[str, Any] | None = None
    inference: Mapping[str, Any] | None = None
    scope: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        _freeze_fields(self, "model_config", "calibration", "inference", "scope")


@dataclass(frozen=True)
class SlideResult:
    """A scored slide: the call and everything it rests on (see the module docstring).

    ``tiles`` (per-tile results, for the writers) is not in ``<id>.json``: a result read back from it
    (``skipped``: scored earlier, outputs intact) has none. ``no_tissue``: the tile stage's record of a
    slide where it found no tissue (the call is then indeterminate, nothing else was scored)."""

    slide_id: str
    call: PartCall
    provenance: Provenance
    tiles_used: int = 0
    tiles_rejected: int = 0
    tumour: Tumour | None = None
    qc_summary: Mapping[str, Any] = field(default_factory=dict)
    groups: Groups | None = None
    timings_s: Mapping[str, float] = field(default_factory=dict)
    outputs: Mapping[str, str] = field(default_factory=dict)
    no_tissue: Mapping[str, Any] | None = None
    tiles: TileResults | None = field(default=None, compare=False, repr=False)
    skipped: bool = False

    def __post_init__(self) -> None:
        _freeze_fields(self, "qc_summary", "timings_s", "outputs", "no_tissue")

    @property
    def criteria(self) -> Mapping[str, Any]:
        return self.call.criteria

    @property
    def row(self) -> dict:
        """The slide's ``slides.csv`` row (:data:`SLIDES_CSV_COLUMNS`). ``tumour_cells`` is the count the call
        was judged on (the graded cells of the 200-cell rule), as in a part's row, so a slide of one region
        shows one number; the scored tumour's count only where the call counts no cells."""
        call, tumour = self.call, self.tumour
        cells = call.details.get("tumour_cells", "" if tumour is None else tumour.cells)
        return {
            "slide": self.slide_id, "her2_score": call.her2_score, "confidence": round(float(call.confidence), 4),
            **{f"frac_{c}": round(float(call.class_fractions.get(c, 0.0)), 4) for c in HER2_CLASSES},
            "tiles_used": self.tiles_used, "tiles_rejected": self.tiles_rejected, "model": self.provenance.model,
            "aggregation": self.provenance.aggregation, "her2_category": call.her2_category,
            "tumour_cells": cells, "tumour_area_mm2": "" if tumour is None else tumour.area_mm2,
            "criteria": call.criteria.get("criteria", ""), "specimen": call.criteria.get("specimen", ""),
        }

    def with_outputs(self, outputs: Mapping[str, str]) -> SlideResult:
        """This result with the paths of the files written from it."""
        return dataclasses.replace(self, outputs=outputs)

    def to_record(self) -> dict:
        """``<id>.json`` (before the digests of its files, which :mod:`wsi_her2.outputs.manifest` adds)."""
        p = self.provenance
        head = {"schema_version": SCHEMA_VERSION, "slide": self.slide_id, "store": p.store}
        if self.no_tissue is not None:
            return _plain({**head, "slide_path": p.slide_path, "call": self.call.to_dict(), "row": self.row,
                                "aggregation": p.aggregation, "model": {"name": p.model}, "package_version": p.package_version,
                                "no_tissue": self.no_tissue, "outputs": self.outputs})
        record = {
            **head, "slide_sha256": p.slide_sha256, "call": self.call.to_dict(), "criteria": self.call.criteria,
            "tumour": {} if self.tumour is None else self.tumour.to_dict(), "calibration": p.calibration, "row": self.row,
            "aggregation": p.aggregation, "model": {"name": p.model, "config": p.model_config, "weights": p.weights},
            "inference": p.inference, "qc_summary": self.qc_summary, "tile_mpp_um": p.tile_mpp_um, "tile_px": p.tile_px,
            "package_version": p.package_version, "timings_s": self.timings_s, "outputs": self.outputs, "parts": p.scope,
        }
        if self.groups is not None:
            record[self.groups.key] = [part.row() for part in self.groups.parts]
        return _plain(record)

    @classmethod
    def from_record(cls, record: Mapping[str, Any], *, slide_id: str | None = None, skipped: bool = False) -> SlideResult:
        """The result ``<id>.json`` holds (any schema version up to :data:`SCHEMA_VERSION`; no per-tile results);
        ``slide_id``: the slide's id when the record (an older one) does not say."""
        model, row = record.get("model") or {}, record.get("row") or {}
        provenance = Provenance(
            model=model.get("name", ""), aggregation=record.get("aggregation", ""), package_version=record.get("package_version", ""),
            model_config=model.get("config"), weights=model.get("weights"), store=record.get("store"),
            slide_sha256=record.get("slide_sha256"), slide_path=record.get("slide_path"), tile_mpp_um=record.get("tile_mpp_um"),
            tile_px=record.get("tile_px"), calibration=record.get("calibration"), inference=record.get("inference"),
            scope=record.get("parts"))
        tumour = record.get("tumour") or None
        kind = next((k for k in ("core", "region") if f"{k}s" in record), None)
        groups = None if kind is None else Groups(kind, tuple(Part.from_row(r) for r in record[f"{kind}s"]))
        return cls(slide_id=str(record.get("slide", slide_id)), call=PartCall.from_dict(record["call"]), provenance=provenance,
                   tiles_used=int(row.get("tiles_used") or 0), tiles_rejected=int(row.get("tiles_rejected") or 0),
                   tumour=None if tumour is None else Tumour(**tumour), qc_summary=record.get("qc_summary") or {},
                   groups=groups, timings_s=record.get("timings_s") or {}, outputs=record.get("outputs") or {},
                   no_tissue=record.get("no_tissue"), skipped=skipped)
