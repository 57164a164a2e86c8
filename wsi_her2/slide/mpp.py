"""Resolve a slide's pixel size (µm per level-0 pixel), always with where it came from.

The one documented chain: user override (``--slide-mpp`` or a per-slide CSV) -> vendor
metadata (``openslide.mpp-x``, ``tiffslide.mpp-x``, ``aperio.MPP``) -> TIFF resolution tags
(only with a physical unit, inch or centimetre) -> refuse. HER2 grading depends on
magnification, so a slide without a pixel size is refused, never guessed.
"""
from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
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


def read_mpp_csv(path: str | Path) -> dict[str, float]:
    """Read a per-slide MPP table: columns ``slide`` (file name, stem or path) and ``mpp``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: MPP table not found")
    table: dict[str, float] = {}
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        cols = {c.lower(): c for c in (reader.fieldnames or [])}
        slide_col = cols.get("slide") or cols.get("path") or cols.get("file")
        mpp_col = cols.get("mpp") or cols.get("mpp_um") or cols.get("slide_mpp")
        if not slide_col or not mpp_col:
            raise ConfigError(f"{path}: needs columns 'slide' and 'mpp' (found {reader.fieldnames})")
        for row in reader:
            if not row.get(mpp_col):
                continue
            try:
                table[Path(row[slide_col]).name] = float(row[mpp_col])
            except ValueError as exc:
                raise ConfigError(f"{path}: bad mpp {row[mpp_col]!r} for {row[slide_col]}") from exc
    return table


def _lookup_csv(table: dict[str, float], slide_path: Path) -> float | None:
    for key in (slide_path.name, slide_path.stem):
        if key in table:
            return table[key]
    return None


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
    mpp_table: dict[str, float] | None = None,
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
        value = _lookup_csv(mpp_table, path)
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
