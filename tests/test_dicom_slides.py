"""DICOM whole-slide images: a real DICOM WSI made from the real CMU-1 fixture tiles and scores like its source.

The DICOM slide is converted at test time with wsidicomizer (a test-only dependency: ``wsi-her2[test]``)
into a temporary folder: the source's pixels re-encoded as 4:4:4 JPEG (quality 95) frames of 512 px,
with its thumbnail, label and overview as further files of the series and a ContainerIdentifier
(and once as 4:2:0 frames, as scanners commonly write them). Never committed. Skips when the fixture or wsidicomizer is missing.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import fixture_slide

CONTAINER_ID = "S26-0421 A1"  # a slide barcode, with a space as barcodes have
SLIDE_ID = "S26-0421_A1"  # ... as a file name


def convert_to_dicom(source: Path, folder: Path, *, container_id: str | None = CONTAINER_ID,
                     subsampling: str = "R444") -> Path:
    """``source`` as a DICOM WSI series in ``folder`` (wsidicomizer through tiffslide, JPEG q95, 4:4:4 unless
    ``subsampling`` names another of wsidicom's ``Subsampling``, e.g. ``R420``)."""
    pytest.importorskip("wsidicomizer", reason="wsidicomizer is missing: pip install 'wsi-her2[test]'")
    from pydicom import Dataset
    from wsidicom.codec import JpegSettings
    from wsidicom.codec.settings import Subsampling
    from wsidicomizer import WsiDicomizer
    from wsidicomizer.wsidicomizer import SourceIdentifier

    extra = Dataset()
    if container_id is not None:
        extra.ContainerIdentifier = container_id
    WsiDicomizer.convert(source, folder, metadata_post_processor=extra, workers=1,
                         preferred_source=SourceIdentifier.TIFFSLIDE,
                         encoding=JpegSettings(quality=95, subsampling=getattr(Subsampling, subsampling)))
    return folder


@pytest.fixture(scope="session")
def cmu_svs() -> Path:
    return fixture_slide("CMU-1-Small-Region.svs")


@pytest.fixture(scope="session")
def cmu_dicom(cmu_svs, tmp_path_factory) -> Path:
    return convert_to_dicom(cmu_svs, tmp_path_factory.mktemp("dicom") / "cmu-1-dicom")


def _edit_copy(folder: Path, dest: Path, edit) -> Path:
    """A copy of the DICOM folder with ``edit(dataset)`` applied to every file."""
    import pydicom

    dest.mkdir()
    for f in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(f)
        edit(ds)
        ds.save_as(dest / f.name, enforce_file_format=True)
    return dest


def _cli(args: list[str], capsys) -> tuple[int, str, str]:
    from wsi_her2.cli import main

    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_folder_and_any_file_open_as_one_slide(cmu_dicom, cmu_svs):
    from wsi_her2.slide import open_slide
    from wsi_her2.slide.mpp import resolve_mpp
    from wsi_her2.tile.pipeline import slide_id_for

    files = sorted(cmu_dicom.glob("*.dcm"))
    assert len(files) >= 3  # the level, and the thumbnail / label / overview of the series
    with open_slide(cmu_svs) as src:
        src_levels = src.levels
    for path in (cmu_dicom, *files):
        assert slide_id_for(path) == SLIDE_ID
        with open_slide(path) as reader:
            assert reader.backend == "openslide" and reader.vendor == "dicom"
            assert reader.levels == src_levels
            mpp = resolve_mpp(reader)
            assert mpp.source == "dicom:PixelSpacing" and mpp.mpp_um == pytest.approx(0.499)
            assert reader.dicom.id_source == "dicom:ContainerIdentifier"
            assert sorted(reader.dicom.files) == files


def test_dicom_tiles_and_calls_equal_the_source(cmu_dicom, cmu_svs, tmp_path, capsys):
    """`wsi-her2 tile` of the folder and of the SVS, `wsi-her2 score --force` (CMU-1 is H&E): same tiles, same call."""
    from wsi_her2.slide.dicom import series_sha256
    from wsi_her2.store.patch_store import PatchStore

    out_svs, out_dcm = tmp_path / "svs", tmp_path / "dcm"
    assert _cli(["tile", str(cmu_svs), "-o", str(out_svs), "-q", "--workers", "1"], capsys)[0] == 0
    code, text, err = _cli(["tile", str(cmu_dicom), "-o", str(out_dcm), "-q", "--workers", "1"], capsys)
    assert code == 0, err
    assert f"{SLIDE_ID}.zarr: tiled" in text
    a = PatchStore.open(out_svs / "CMU-1-Small-Region.zarr")
    b = PatchStore.open(out_dcm / f"{SLIDE_ID}.zarr")
    np.testing.assert_array_equal(a.coords_level0, b.coords_level0)  # the same tile plan, exactly
    np.testing.assert_array_equal(a.qc_flags, b.qc_flags)
    ta, tb = a.read_tiles(0, a.n_tiles).astype(np.int16), b.read_tiles(0, b.n_tiles).astype(np.int16)
    # JPEG tolerance: the DICOM frames are one more JPEG generation (q95) of the source's JPEG tiles
    mse = float(np.mean((ta - tb) ** 2.0))
    psnr_db = 10 * np.log10(255.0**2 / mse)
    assert np.abs(ta - tb).mean() < 3.0 and psnr_db > 35.0, (np.abs(ta - tb).mean(), psnr_db)

    rec = b.attrs["slide"]
    files = sorted(cmu_dicom.glob("*.dcm"))
    assert rec["sha256"] == series_sha256(files)
    listing = "".join(f"{hashlib.sha256(f.read_bytes()).hexdigest()}  {f.name}\n" for f in files)
    assert rec["sha256"] == hashlib.sha256(listing.encode()).hexdigest()  # `sha256sum *.dcm | sha256sum`
    assert rec["mpp_source"] == "dicom:PixelSpacing" and rec["dicom"]["id_source"] == "dicom:ContainerIdentifier"
    assert rec["size_bytes"] == sum(f.stat().st_size for f in files)

    # one file of the folder names the same slide: the complete store is reused, not rebuilt
    code, text, _ = _cli(["tile", str(files[0]), "-o", str(out_dcm), "-q"], capsys)
    assert code == 0 and f"{SLIDE_ID}.zarr: skipped" in text

    for out in (out_svs, out_dcm):
        code, _, err = _cli(["score", str(out), "--force", "-q", "--no-report"], capsys)
        assert code == 0, err
    ra = json.loads((out_svs / "CMU-1-Small-Region.json").read_text())
    rb = json.loads((out_dcm / f"{SLIDE_ID}.json").read_text())
    assert ra["call"]["her2_score"] == rb["call"]["her2_score"]
    assert ra["call"]["her2_category"] == rb["call"]["her2_category"]
    for key, value in ra["call"]["details"]["fraction_at_least"].items():
        assert rb["call"]["details"]["fraction_at_least"][key] == pytest.approx(value, abs=0.03)


def test_colour_subsampling_is_read_from_the_frames(cmu_dicom, cmu_svs, tmp_path):
    """A DICOM slide's chroma subsampling comes from its first frame's JPEG header: 4:4:4 is full colour,
    4:2:0 records colour samples twice the pixel size (the scorer scales a membrane's colour back by it)."""
    from wsi_her2.slide import open_slide
    from wsi_her2.slide.chroma import level_chroma_factors
    from wsi_her2.store.patch_store import PatchStore
    from wsi_her2.tile.pipeline import TileConfig, tile_slide

    with open_slide(cmu_dicom) as reader:
        sizes = [(lv.width_px, lv.height_px) for lv in reader.levels]
    assert level_chroma_factors(cmu_dicom, sizes) == [1]
    subsampled = convert_to_dicom(cmu_svs, tmp_path / "420", subsampling="R420")
    assert level_chroma_factors(subsampled, sizes) == [2]
    assert level_chroma_factors(subsampled, [(17, 17)]) == [None]  # a level the files do not hold: unknown
    store = PatchStore.open(tile_slide(subsampled, tmp_path / "out", config=TileConfig(workers=1, qc_png=False)).store)
    tiling = store.attrs["tiling"]
    assert tiling["chroma_factor"] == 2
    assert tiling["chroma_mpp_um"] == pytest.approx(2 * store.attrs["slide"]["mpp_um"], rel=0.01)


def test_a_dicom_slide_whose_pixels_fail_is_closed_before_the_refusal(cmu_dicom, monkeypatch):
    import wsi_her2.slide as slide_mod
    from wsi_her2.errors import SlideOpenError
    from wsi_her2.slide.dicom import DicomSlideReader, is_dicom_input

    assert is_dicom_input(cmu_dicom) and is_dicom_input(sorted(cmu_dicom.glob("*.dcm"))[0])
    closed = []
    real_close = DicomSlideReader.close
    monkeypatch.setattr(DicomSlideReader, "close", lambda self: closed.append(self) or real_close(self))
    monkeypatch.setattr(slide_mod, "_check_readable", lambda reader: (_ for _ in ()).throw(ValueError("frame 3 bad")))
    with pytest.raises(SlideOpenError, match="frame 3 bad"):
        slide_mod.open_slide(cmu_dicom)
    assert len(closed) == 1


def test_identifier_falls_back_to_specimen_then_series(cmu_dicom, tmp_path):
    from wsi_her2.slide.dicom import dicom_slide

    def specimen_only(ds):
        ds.ContainerIdentifier = "Unknown"  # what converters write when the scanner gave none
        ds.SpecimenDescriptionSequence[0].SpecimenIdentifier = "SP 7/2026"

    def neither(ds):
        ds.ContainerIdentifier = "Unknown"
        ds.SpecimenDescriptionSequence[0].SpecimenIdentifier = ""

    spec = dicom_slide(_edit_copy(cmu_dicom, tmp_path / "spec", specimen_only))
    assert (spec.slide_id, spec.id_source) == ("SP_7_2026", "dicom:SpecimenIdentifier")
    series = dicom_slide(_edit_copy(cmu_dicom, tmp_path / "series", neither))
    assert series.id_source == "dicom:SeriesInstanceUID" and series.slide_id == series.series_uid


def test_refusals_are_one_line_with_a_non_zero_exit(cmu_dicom, tmp_path, capsys):
    def no_spacing(ds):
        if "SharedFunctionalGroupsSequence" in ds:
            del ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence

    cases = {}
    cases["no pixel size"] = (_edit_copy(cmu_dicom, tmp_path / "nompp", no_spacing), "no pixel size (MPP)")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no slide here\n")
    cases["no DICOM files"] = (empty, "holding no DICOM (.dcm) files")
    broken = tmp_path / "broken"
    shutil.copytree(cmu_dicom, broken)
    victim = max(broken.glob("*.dcm"), key=lambda p: p.stat().st_size)  # the level's file
    victim.write_bytes(victim.read_bytes()[:4000])
    cases["truncated"] = (broken, "broken")
    two = tmp_path / "two"
    shutil.copytree(cmu_dicom, two)
    import pydicom
    from pydicom.uid import generate_uid

    series_b = generate_uid()
    for f in sorted(cmu_dicom.glob("*.dcm")):  # a second slide (series) in the same folder
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = series_b
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.ContainerIdentifier = "S26-0421 B1"
        ds.save_as(two / f"b-{f.name}", enforce_file_format=True)
    cases["two slides"] = (two, "holds 2 DICOM slides (S26-0421_A1, S26-0421_B1)")
    for what, (path, expected) in cases.items():
        for command in (["info", str(path)], ["tile", str(path), "-o", str(tmp_path / "out"), "-q"]):
            code, text, err = _cli(command, capsys)
            assert code != 0, (what, command)
            if command[0] == "info" and what == "no pixel size":  # info prints what it found, then the problem
                err = text.splitlines()[-1]
            lines = [line for line in err.strip().splitlines() if "slides failed" not in line]  # tile's summary line
            assert len(lines) == 1 and "Traceback" not in err, (what, err)
            if what != "truncated":
                assert expected in lines[0], (what, lines[0])
            else:
                assert str(path) in lines[0] and ("cannot" in lines[0]), lines[0]
    # the pixel size given by hand is used, as for any slide
    code, text, err = _cli(["info", str(tmp_path / "nompp"), "--slide-mpp", "0.5"], capsys)
    assert code == 0 and "0.5 µm/px (from user)" in text, err
    code, _, err = _cli(["info", str(cmu_dicom), "--backend", "tiffslide"], capsys)
    assert code != 0 and "read through OpenSlide" in err


def test_cohort_folder_takes_dicom_slides(cmu_dicom, cmu_svs, tmp_path):
    from wsi_her2.batch.manifest import load_jobs
    from wsi_her2.batch.state import input_key

    cohort = tmp_path / "cohort"
    cohort.mkdir()
    shutil.copy(cmu_svs, cohort / cmu_svs.name)
    shutil.copytree(cmu_dicom, cohort / "case-12")
    jobs = load_jobs(cohort)
    assert [(j.slide_id, j.path.name) for j in jobs] == [("CMU-1-Small-Region", cmu_svs.name), (SLIDE_ID, "case-12")]
    key = input_key(cohort / "case-12", mpp_um=None)
    victim = sorted((cohort / "case-12").glob("*.dcm"))[0]
    victim.write_bytes(victim.read_bytes() + b"\0")  # a file of the slide changed: a new input
    assert input_key(cohort / "case-12", mpp_um=None) != key
