"""Resolve a slide's pixel size (µm per level-0 pixel), always with where it came from.

The one documented chain: user override (``--slide-mpp`` or a per-slide CSV, matched to the
slide by :class:`MppTable`: its path first, its base name only when unambiguous) -> vendor
metadata (``openslide.mpp-x``, ``tiffslide.mpp-x``, ``aperio.MPP``) -> TIFF resolution tags
(only with a physical unit, inch or centimetre) -> refuse. HER2 grading depends on
magnification, so a slide without a pixel size is refused, never guessed.
"""
from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from wsi_her2.errors import ConfigError, MppMissingError
from wsi_her2.slide.base import SlideReader

log = logging.getLogger(__name__)

# Whole-slide scanners work between ~0.1 µm/px (100x) and ~10 µm/px (macro images). Values
# outside this are screen or print resolutions (72 dpi = 353 µm/px), not pixel sizes.
PLAUSIBLE_MPP_UM = (0.05, 20.0)


@dataclass(frozen=True)
class MppInfo:
    mpp_um: float
    source: str  # "user", "csv:<file>", "vendor:<property>", "tiff:XResolution"


def _plausible(mpp_um: float) -> bool:
    return PLAUSIBLE_MPP_UM[0] <= mpp_um <= PLAUSIBLE_MPP_UM[1]


@dataclass(frozen=True)
class MppRow:
    written: str  # the slide column as written
    path: Path  # resolved: relative paths are taken from the CSV's folder (as in manifests)
    mpp_um: float
    line: int


class MppTable:
    """A per-slide MPP table (``--mpp-csv``) and the rule that finds a slide's row.

    1. A row whose path resolves to the slide file is its row.
    2. Otherwise a row by base name (file name, or the name without its suffix), and only when that
       base name is on one row of the table: a bare name, or a path that does not exist here (the
       table was written on another machine); the match is noted in the log. A row whose path is an
       existing file other than the slide names that file, never this slide.
    3. Several rows that could be the slide (the same path twice with two values, or one base name
       on several rows) are refused with one line: write the slide's full path in the table.
    """

    def __init__(self, source: Path, rows: list[MppRow]) -> None:
        self.source, self.rows = source, tuple(rows)
        # indexes, so a cohort's lookups do not each scan the table
        self._by_path: dict[Path, list[MppRow]] = {}
        self._by_name: dict[str, list[MppRow]] = {}
        for row in self.rows:
            self._by_path.setdefault(row.path, []).append(row)
            self._by_name.setdefault(Path(row.written).name, []).append(row)

    def lookup(self, slide_path: Path) -> float | None:
        """The slide's MPP from the table, ``None`` if no row is the slide's (see the class docstring)."""
        slide_path = Path(slide_path)
        resolved = slide_path.resolve()
        by_path = self._by_path.get(resolved, [])
        if by_path:
            if len({r.mpp_um for r in by_path}) > 1:
                self._refuse(by_path, slide_path)
            return by_path[0].mpp_um
        for key in (slide_path.name, slide_path.stem):
            same_name = self._by_name.get(key, [])
            # a row with a folder whose file exists here names that other file, never this slide
            candidates = [r for r in same_name if Path(r.written).name == r.written or not r.path.is_file()]
            if not candidates:
                continue
            if len(same_name) > 1:
                self._refuse(same_name, slide_path)
            row = candidates[0]
            log.info("%s: MPP %s from %s line %d, matched by the base name %r alone (no row holds the slide's path)",
                     slide_path, row.mpp_um, self.source.name, row.line, key)
            return row.mpp_um
        return None

    def _refuse(self, rows: list[MppRow], slide_path: Path) -> None:
        lines = ", ".join(f"line {r.line} ({r.written}: {r.mpp_um})" for r in rows)
        raise ConfigError(f"{self.source}: {len(rows)} rows could give the MPP of {slide_path} ({lines}); "
                          "write each slide's full path in the slide column, once")


def read_mpp_csv(path: str | Path) -> MppTable:
    """Read a per-slide MPP table: columns ``slide`` (path, file name or stem) and ``mpp``.

    Read once per version of the file: a command tiling many slides with one ``--mpp-csv`` gets the same
    table for each, and a table edited meanwhile is read again."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: MPP table not found")
    st = path.stat()
    return _read_mpp_csv(path, (path.resolve(), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))


@lru_cache(maxsize=8)
def _read_mpp_csv(path: Path, _version: tuple) -> MppTable:
    rows: list[MppRow] = []
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        cols = {c.lower(): c for c in (reader.fieldnames or [])}
        slide_col = cols.get("slide") or cols.get("path") or cols.get("file")
        mpp_col = cols.get("mpp") or cols.get("mpp_um") or cols.get("slide_mpp")
        if not slide_col or not mpp_col:
            raise ConfigError(f"{path}: needs columns 'slide' and 'mpp' (found {reader.fieldnames})")
        for line, row in enumerate(reader, start=2):
            written = (row.get(slide_col) or "").strip()
            if not row.get(mpp_col) or not written:
                continue
            try:
                mpp_um = float(row[mpp_col])
            except ValueError as exc:
                raise ConfigError(f"{path}: bad mpp {row[mpp_col]!r} for {written}") from exc
            rows.append(MppRow(written, (path.parent / Path(written).expanduser()).resolve(), mpp_um, line))
    return MppTable(path, rows)


def _tiff_tag_mpp(path: Path) -> float | None:
    """Pixel size from the first page's XResolution/ResolutionUnit (TIFF family only)."""
    try:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            unit = page.tags.get("ResolutionUnit")
            xres = page.tags.get("XResolution")
            if unit is None or xres is None:
                return None
            unit_value = int(unit.value)
            num, den = xres.value if isinstance(xres.value, tuple) else (xres.value, 1)
            if not num or not den:
                return None
            px_per_unit = num / den
            um_per_unit = {2: 25_400.0, 3: 10_000.0}.get(unit_value)
            if um_per_unit is None:  # 1 = no absolute unit
                return None
            return um_per_unit / px_per_unit
    except Exception as exc:  # not a TIFF, or unreadable tags: simply no evidence here
        log.debug("no TIFF resolution tags in %s: %s", path, exc)
        return None


def resolve_mpp(
    reader: SlideReader,
    *,
    override_mpp_um: float | None = None,
    mpp_table: MppTable | None = None,
    mpp_table_name: str = "csv",
) -> MppInfo:
    """Return the slide's level-0 pixel size and its provenance, or refuse.

    Raises
    ------
    MppMissingError
        Neither the user nor the file gives a plausible pixel size.
    """
    path = reader.path
    if override_mpp_um is not None:
        if not _plausible(override_mpp_um):
            raise ConfigError(f"--slide-mpp {override_mpp_um} is outside {PLAUSIBLE_MPP_UM} µm/px")
        return MppInfo(float(override_mpp_um), "user")
    if mpp_table:
        value = mpp_table.lookup(path)
        if value is not None:
            if not _plausible(value):
                raise ConfigError(f"{path.name}: MPP {value} from {mpp_table_name} is outside {PLAUSIBLE_MPP_UM} µm/px")
            return MppInfo(float(value), f"csv:{mpp_table_name}")
    vendor = reader.vendor_mpp_um()
    if vendor is not None and _plausible(vendor[0]):
        return MppInfo(vendor[0], vendor[1])
    tag = _tiff_tag_mpp(path)
    if tag is not None and _plausible(tag):
        return MppInfo(tag, "tiff:XResolution")
    raise MppMissingError(
        f"{path}: the slide has no pixel size (MPP) in its metadata; pass --slide-mpp 0.25 (the scanner's "
        f"µm per pixel at full resolution) or list it in --mpp-csv (columns slide,mpp)"
    )
