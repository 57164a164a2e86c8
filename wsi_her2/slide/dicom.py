"""DICOM whole-slide images (VL Whole Slide Microscopy): a slide's folder of ``.dcm`` files, or any one file of it.

A DICOM slide is one *series*: one file per pyramid level (often JPEG or JPEG 2000 frames), plus
label, overview and thumbnail images, all sharing a SeriesInstanceUID. Hospitals deliver a slide
as its folder; a study export may hold several slides' series in one folder.

- **Pixels** come from OpenSlide 4 (``openslide-bin`` ships libdicom and the DICOM reader), the
  same C library and adapter that read NDPI, MRXS and the rest: no second pixel path to keep
  right, JPEG / JPEG 2000 frames decoded in C.
- **Headers** (which files form which slide, its identifiers and pixel spacing) are read with
  pydicom, pure Python, stopping before the pixel data: OpenSlide reports only the series it
  opened, not which files of a folder belong to another slide. Of the pixel data only the start
  of each level's first frame is read, for its JPEG chroma subsampling (:mod:`wsi_her2.slide.chroma`).

The slide's id (it names every output file) is its ContainerIdentifier (the slide's barcode),
else the SpecimenIdentifier of its specimen description, else its SeriesInstanceUID; placeholder
values converters write ("Unknown", "None", empty) count as absent. The pixel size is the
PixelSpacing of the largest VOLUME image (SharedFunctionalGroupsSequence > PixelMeasuresSequence,
else the first frame's), in mm, times 1000.

The slide's digest (the store's ``slide.sha256``) is the SHA-256 of the lines
``"<sha256 of the file>  <file name>\\n"`` of the series' files sorted by name: what
``cd FOLDER && LC_ALL=C sha256sum *.dcm | sha256sum`` prints when the folder holds one slide.
"""
from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from wsi_her2.errors import SlideNotFoundError, SlideOpenError
from wsi_her2.slide.base import SlideReader, short_error
from wsi_her2.digests import sha256_file

log = logging.getLogger(__name__)

DICOM_SUFFIX = ".dcm"
#: VL Whole Slide Microscopy Image Storage
WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"
#: values converters write where the scanner gave no identifier
_PLACEHOLDERS = {"", "unknown", "none", "n/a", "na", "null", "-"}
_HEADER_TAGS = (
    "SOPClassUID", "SeriesInstanceUID", "ImageType", "ContainerIdentifier", "SpecimenDescriptionSequence",
    "SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence", "TotalPixelMatrixColumns",
    "TotalPixelMatrixRows",
)


def has_dicom_magic(path: Path) -> bool:
    """A DICOM Part 10 file: 128 bytes of preamble, then ``DICM``."""
    try:
        with path.open("rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def is_dicom_file(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and (
        path.suffix.lower() == DICOM_SUFFIX or has_dicom_magic(path))


def dicom_files(folder: Path) -> list[Path]:
    """The DICOM files directly in ``folder`` (``.dcm``, or any file with the DICM preamble), sorted by name."""
    try:
        entries = sorted(folder.iterdir(), key=lambda p: p.name)
    except OSError:
        return []
    return [p for p in entries if is_dicom_file(p)]


def is_dicom_input(path: Path) -> bool:
    """``path`` is a DICOM file or a folder holding DICOM files (cheap: names and 132 bytes per file)."""
    path = Path(path)
    if path.is_dir():
        return any(is_dicom_file(p) for p in _first_entries(path))
    return is_dicom_file(path)


def _first_entries(folder: Path, n: int = 64):
    try:
        for i, p in enumerate(sorted(folder.iterdir(), key=lambda p: p.name)):
            if i >= n:
                return
            yield p
    except OSError:
        return


@dataclass(frozen=True)
class DicomSlide:
    """One DICOM slide (series) as found on disk."""

    folder: Path
    files: tuple[Path, ...]  # the series' files, sorted by name
    series_uid: str
    slide_id: str
    id_source: str  # "dicom:ContainerIdentifier" | "dicom:SpecimenIdentifier" | "dicom:SeriesInstanceUID"
    volume_file: Path  # the largest VOLUME image: OpenSlide opens the series through it
    mpp_um: float | None  # from PixelSpacing, None when absent


def _read_header(path: Path):
    import pydicom

    try:
        return pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(_HEADER_TAGS))
    except Exception as exc:  # pydicom raises many types on damaged files
        raise SlideOpenError(
            f"{path}: cannot read its DICOM header ({type(exc).__name__}: {short_error(exc)}); "
            "re-copy or re-export the slide") from exc


def _text(value) -> str:
    return " ".join(str(value).split()) if value is not None else ""


def _real(value) -> str | None:
    text = _text(value)
    return None if text.lower() in _PLACEHOLDERS else text


def _safe_id(text: str) -> str:
    """An identifier as a file name: letters, digits, ``.``, ``_`` and ``-`` kept, anything else ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", text).lstrip(".") or "_"


def _identifier(ds) -> tuple[str, str]:
    container = _real(ds.get("ContainerIdentifier"))
    if container:
        return _safe_id(container), "dicom:ContainerIdentifier"
    for item in ds.get("SpecimenDescriptionSequence") or []:
        specimen = _real(item.get("SpecimenIdentifier"))
        if specimen:
            return _safe_id(specimen), "dicom:SpecimenIdentifier"
    return _safe_id(_text(ds.get("SeriesInstanceUID"))), "dicom:SeriesInstanceUID"


def _pixel_spacing_mm(ds) -> float | None:
    for seq_name in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        seq = ds.get(seq_name) or []
        if not seq:
            continue
        measures = seq[0].get("PixelMeasuresSequence") or []
        spacing = measures[0].get("PixelSpacing") if measures else None
        if spacing is not None and len(spacing) >= 2:
            try:
                column_mm = float(spacing[1])  # (row spacing = y, column spacing = x), mm
            except (TypeError, ValueError):
                return None
            return column_mm if column_mm > 0 else None
    return None


def _is_volume(ds) -> bool:
    kinds = [str(v).upper() for v in (ds.get("ImageType") or [])]
    return len(kinds) < 3 or kinds[2] == "VOLUME"


def series_in(folder: Path) -> dict[str, list[tuple[Path, object]]]:
    """Whole-slide DICOM files of ``folder`` grouped by SeriesInstanceUID (headers only)."""
    groups: dict[str, list[tuple[Path, object]]] = {}
    for path in dicom_files(folder):
        ds = _read_header(path)
        if str(ds.get("SOPClassUID", "")) != WSI_SOP_CLASS:
            log.debug("%s: not a whole-slide image (SOP class %s); ignored", path, ds.get("SOPClassUID"))
            continue
        groups.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((path, ds))
    return groups


def _stamp(path: Path) -> tuple:
    """What changes when a slide folder's files change (names, sizes, times)."""
    folder = path if path.is_dir() else path.parent
    return tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in dicom_files(folder))


def dicom_slide(path: str | Path) -> DicomSlide:
    """The slide at ``path`` (its folder, or one of its files), from the headers of the folder's DICOM files.

    Raises
    ------
    SlideNotFoundError
        A folder holding no DICOM files.
    SlideOpenError
        An unreadable header, no whole-slide image, several slides in the folder (given the folder), or a
        series without a VOLUME image.
    """
    path = Path(path).resolve()
    return _dicom_slide(path, _stamp(path))


@lru_cache(maxsize=64)
def _dicom_slide(path: Path, _stamp_key: tuple) -> DicomSlide:
    folder = path if path.is_dir() else path.parent
    if not dicom_files(folder):
        raise SlideNotFoundError(f"{path}: a folder holding no DICOM (.dcm) files; pass a slide file or a DICOM slide's folder")
    groups = series_in(folder)
    if path.is_dir():
        if not groups:
            raise SlideOpenError(f"{path}: its DICOM files hold no whole-slide image (VL Whole Slide Microscopy); "
                                 "pass a DICOM whole-slide image's folder")
        if len(groups) > 1:
            ids = sorted(_identifier(members[0][1])[0] for members in groups.values())
            raise SlideOpenError(
                f"{path}: holds {len(groups)} DICOM slides ({', '.join(ids)}); pass one .dcm file of the slide you want, "
                "put each slide in its own folder, or give the folder to `wsi-her2 run`, which takes each slide")
        series_uid, members = next(iter(groups.items()))
    else:
        own = next(((uid, m) for uid, m in groups.items() if any(p == path for p, _ in m)), None)
        if own is None:
            ds = _read_header(path)
            raise SlideOpenError(
                f"{path}: not a whole-slide image (DICOM SOP class {ds.get('SOPClassUID', '?')}); "
                "pass a VL Whole Slide Microscopy file or its folder")
        series_uid, members = own
    volumes = [(p, ds) for p, ds in members if _is_volume(ds)]
    if not volumes:
        raise SlideOpenError(f"{path}: the DICOM slide has no VOLUME image (only labels, overviews or thumbnails); "
                             "export the slide with its pyramid levels")
    volume_file, volume_ds = max(volumes, key=lambda m: int(m[1].get("TotalPixelMatrixColumns") or 0))
    slide_id, id_source = _identifier(volume_ds)
    spacing = _pixel_spacing_mm(volume_ds)
    return DicomSlide(
        folder=folder, files=tuple(sorted((p for p, _ in members), key=lambda p: p.name)), series_uid=series_uid,
        slide_id=slide_id, id_source=id_source, volume_file=volume_file,
        mpp_um=None if spacing is None else spacing * 1000.0,
    )


@dataclass(frozen=True)
class VolumeFrames:
    """What one VOLUME file of a slide says about its pixels' colour (read by :mod:`wsi_her2.slide.chroma`)."""

    size_px: tuple[int, int]  # TotalPixelMatrixColumns, TotalPixelMatrixRows: the level's size
    transfer_syntax: str  # how its frames are encoded (JPEG_TRANSFER_SYNTAXES: JPEG streams)
    photometric: str  # PhotometricInterpretation, e.g. YBR_FULL_422
    first_frame: bytes  # the start of its first non-empty frame; b"" when the pixels are not encapsulated


#: JPEG baseline, extended and lossless: frames that carry a JPEG frame header (SOF) with the sampling factors
JPEG_TRANSFER_SYNTAXES = frozenset({"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57",
                                    "1.2.840.10008.1.2.4.70"})
_FRAME_TAGS = ("SOPClassUID", "ImageType", "PhotometricInterpretation", "TotalPixelMatrixColumns", "TotalPixelMatrixRows")
_ITEM_TAG = b"\xfe\xff\x00\xe0"
_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"


def volume_frames(slide: DicomSlide, *, max_bytes: int = 4096) -> list[VolumeFrames]:
    """Each VOLUME file of ``slide`` (one per pyramid level, more with concatenations or focal planes):
    its size, encoding and the first ``max_bytes`` of its first non-empty frame (headers and one frame's
    start only, however large the file)."""
    import pydicom

    found = []
    for path in slide.files:
        with path.open("rb") as fh:
            # stops with the file at the PixelData element, so its frames can be read from there
            ds = pydicom.dcmread(fh, stop_before_pixels=True, specific_tags=list(_FRAME_TAGS))
            if str(ds.get("SOPClassUID", "")) != WSI_SOP_CLASS or not _is_volume(ds):
                continue
            found.append(VolumeFrames(
                size_px=(int(ds.get("TotalPixelMatrixColumns") or 0), int(ds.get("TotalPixelMatrixRows") or 0)),
                transfer_syntax=str(ds.file_meta.get("TransferSyntaxUID", "")),
                photometric=str(ds.get("PhotometricInterpretation", "")), first_frame=_first_frame(fh, max_bytes)))
    return found


def _first_frame(fh, max_bytes: int, max_items: int = 64) -> bytes:
    """The first ``max_bytes`` of the first non-empty fragment of encapsulated pixel data starting at ``fh``'s
    position (explicit VR little endian, as every compressed transfer syntax is); b"" for native pixels."""
    head = fh.read(12)  # tag, VR, 2 reserved bytes, 4-byte length (undefined: encapsulated)
    if len(head) < 12 or head[:4] != _PIXEL_DATA_TAG or head[8:12] != b"\xff\xff\xff\xff":
        return b""
    for k in range(max_items):
        item = fh.read(8)
        if len(item) < 8 or item[:4] != _ITEM_TAG:  # the sequence's end, or not what the standard writes
            return b""
        length = int.from_bytes(item[4:8], "little")
        if k > 0 and length > 0:  # item 0 is the Basic Offset Table, not a frame
            return fh.read(min(max_bytes, length))
        fh.seek(length, 1)
    return b""


def series_sha256(files: tuple[Path, ...] | list[Path]) -> str:
    """SHA-256 of ``"<sha256>  <name>\\n"`` for each file, sorted by name (``sha256sum *.dcm | sha256sum``)."""
    digest = hashlib.sha256()
    for path in sorted(files, key=lambda p: p.name):
        digest.update(f"{sha256_file(path)}  {path.name}\n".encode())
    return digest.hexdigest()


class DicomSlideReader(SlideReader):
    """A DICOM slide read through OpenSlide; ``path`` stays what the user gave (the folder or a file)."""

    backend = "openslide"

    def __init__(self, path: Path, slide: DicomSlide | None = None) -> None:
        from wsi_her2.slide.openslide_reader import OpenSlideReader

        super().__init__(path)
        self.dicom = slide or dicom_slide(path)
        self._osr = OpenSlideReader(self.dicom.volume_file)
        self._set_metadata([(lv.width_px, lv.height_px) for lv in self._osr.levels],
                           [lv.downsample for lv in self._osr.levels], self._osr.properties, self._osr.backend_version)

    @property
    def vendor(self) -> str | None:
        return "dicom"

    def vendor_mpp_um(self) -> tuple[float, str] | None:
        if self.dicom.mpp_um is not None:
            return self.dicom.mpp_um, "dicom:PixelSpacing"
        return None  # OpenSlide's openslide.mpp-x comes from the same attribute: nothing else to try

    def read_level_region(self, level: int, x_px: int, y_px: int, w_px: int, h_px: int):
        return self._osr.read_level_region(level, x_px, y_px, w_px, h_px)

    def close(self) -> None:
        self._osr.close()
