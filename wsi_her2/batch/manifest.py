"""Turn a cohort source (a directory of slides, or a manifest CSV) into a list of :class:`SlideJob`.

A manifest is a CSV with one row per slide. Columns (case-insensitive; only ``slide`` is required):

``slide`` (or ``path``, ``file``)
    The slide file; relative paths are relative to the manifest's directory.
``mpp`` (or ``mpp_um``, ``slide_mpp``)
    The slide's pixel size in µm per level-0 pixel, used when its metadata lacks one.
``label`` (or ``her2``, ``her2_label``, ``truth``)
    The reference HER2 score (0, 1+, 2+, 3+) for the agreement report.
``patient`` (or ``patient_id``, ``case``)
    The patient the slide belongs to (copied to ``slides.csv``).

The slide id (which names every output file) is the file name without its extension (a DICOM
slide's: its container or specimen identifier, else its series UID), so two slides must not share
a name. In a folder, a DICOM slide is a sub-folder holding its ``.dcm`` files; ``.dcm`` files lying
in the folder itself are taken one slide (series) each.

Jobs come back sorted by slide id, so every run sees the cohort in the same order.
"""
from __future__ import annotations

import csv
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from wsi_her2.vocab import parse_her2_label
from wsi_her2.errors import ConfigError, SlideNotFoundError, WsiHer2Error
from wsi_her2.tile.pipeline import slide_id_for

log = logging.getLogger(__name__)

#: File suffixes taken as slides when the source is a directory (lower case).
SLIDE_SUFFIXES = (
    ".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide", ".qptiff",
)

_COLUMNS = {
    "slide": ("slide", "path", "file", "filename"),
    "mpp": ("mpp", "mpp_um", "slide_mpp", "slide_mpp_um"),
    "label": ("label", "her2", "her2_label", "her2_score", "truth"),
    "patient": ("patient", "patient_id", "case", "case_id"),
}


@dataclass(frozen=True)
class SlideJob:
    """One slide of a cohort and its per-slide settings."""

    slide_id: str
    path: Path
    mpp_um: float | None = None
    label: str | None = None
    patient_id: str | None = None

    def to_dict(self) -> dict:
        out = asdict(self)
        out["path"] = str(self.path)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "SlideJob":
        return cls(
            slide_id=data["slide_id"], path=Path(data["path"]), mpp_um=data.get("mpp_um"),
            label=data.get("label"), patient_id=data.get("patient_id"),
        )


def is_slide_file(path: Path) -> bool:
    name = path.name.lower()
    return path.is_file() and not name.startswith(".") and name.endswith(SLIDE_SUFFIXES)


def _dicom_slides_in(folder: Path) -> list[Path]:
    """A path per DICOM slide in ``folder``: the folder when it holds one slide, else a file of each series."""
    from wsi_her2.slide.dicom import dicom_files, series_in

    if not dicom_files(folder):
        return []
    try:
        series = series_in(folder)
    except WsiHer2Error:
        return [folder]  # an unreadable file: the slide fails with that line when it is tiled
    if len(series) <= 1:
        return [folder]
    return [sorted(p for p, _ in members)[0] for members in series.values()]


def jobs_from_directory(directory: str | Path, *, recursive: bool = False) -> list[SlideJob]:
    """Every slide in ``directory`` (sub-directories too with ``recursive``), sorted by slide id."""
    directory = Path(directory)
    if not directory.is_dir():
        raise SlideNotFoundError(f"{directory}: not a directory; pass a folder of slides or a manifest .csv")
    paths = list(directory.rglob("*") if recursive else directory.iterdir())
    folders = [directory] + [p for p in paths if p.is_dir() and not p.name.startswith(".")]
    slides = [p for p in paths if is_slide_file(p)] + [s for f in folders for s in _dicom_slides_in(f)]
    jobs = [SlideJob(slide_id_for(p), p) for p in slides]
    if not jobs:
        raise SlideNotFoundError(
            f"{directory}: no slide files found (looked for {', '.join(SLIDE_SUFFIXES)} and DICOM slide folders); "
            "check the folder, add --recursive, or list the slides in a manifest .csv"
        )
    return _check_unique(sorted(jobs, key=lambda j: j.slide_id), str(directory))


def read_manifest(path: str | Path) -> list[SlideJob]:
    """Read a manifest CSV (see the module docstring), sorted by slide id."""
    path = Path(path)
    if not path.is_file():
        raise SlideNotFoundError(f"{path}: manifest not found")
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        fields = [f for f in (reader.fieldnames or []) if f]
        lower = {f.strip().lower(): f for f in fields}
        cols = {key: next((lower[a] for a in aliases if a in lower), None) for key, aliases in _COLUMNS.items()}
        if cols["slide"] is None:
            raise ConfigError(f"{path}: a manifest needs a 'slide' column (found {fields})")
        jobs = []
        for line, row in enumerate(reader, start=2):
            where = f"{path}:{line}: "
            raw = (row.get(cols["slide"]) or "").strip()
            if not raw:
                continue  # blank lines are common at the end of spreadsheets
            slide = Path(raw).expanduser()
            if not slide.is_absolute():
                slide = path.parent / slide
            mpp = _float_or_none(row.get(cols["mpp"]) if cols["mpp"] else None, where=where)
            label = parse_her2_label(row.get(cols["label"]) if cols["label"] else None, where=where)
            patient = (row.get(cols["patient"]) or "").strip() or None if cols["patient"] else None
            slide_id = slide_id_for(slide)
            jobs.append(SlideJob(slide_id, slide, mpp_um=mpp, label=label, patient_id=patient))
    if not jobs:
        raise ConfigError(f"{path}: the manifest lists no slides")
    return _check_unique(sorted(jobs, key=lambda j: j.slide_id), str(path))


def load_jobs(source: str | Path, *, recursive: bool = False) -> list[SlideJob]:
    """A directory of slides or a manifest ``.csv`` -> jobs sorted by slide id."""
    source = Path(source)
    if source.is_dir():
        return jobs_from_directory(source, recursive=recursive)
    if source.suffix.lower() in (".csv", ".tsv", ".txt"):
        return read_manifest(source)
    if source.exists():
        raise ConfigError(f"{source}: expected a folder of slides or a manifest .csv")
    raise SlideNotFoundError(f"{source}: no such folder or manifest")


def _float_or_none(value: str | None, *, where: str) -> float | None:
    if value is None or not str(value).strip():
        return None
    try:
        out = float(value)
    except ValueError:
        raise ConfigError(f"{where}mpp {value!r} is not a number (µm per pixel, e.g. 0.25)") from None
    if not out > 0:
        raise ConfigError(f"{where}mpp {value!r} must be positive (µm per pixel, e.g. 0.25)")
    return out


def _check_unique(jobs: list[SlideJob], where: str) -> list[SlideJob]:
    seen: dict[str, Path] = {}
    for job in jobs:
        if job.slide_id in seen:
            raise ConfigError(
                f"{where}: two slides share the id {job.slide_id!r} ({seen[job.slide_id]} and {job.path}); "
                "their outputs would overwrite each other: rename one of the files"
            )
        seen[job.slide_id] = job.path
    return jobs
