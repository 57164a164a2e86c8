"""One contract for both reader backends, on the real fixtures and a synthetic slide."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import fixture_slide
from wsi_her2.errors import MppMissingError, SlideNotFoundError, SlideOpenError, WsiHer2Error
from wsi_her2.slide import open_slide
from wsi_her2.slide.mpp import read_mpp_csv, resolve_mpp

BACKENDS = ["openslide", "tiffslide"]


@pytest.mark.parametrize("backend", BACKENDS)
class TestReaderContract:
    def test_cmu_metadata(self, backend):
        with open_slide(fixture_slide("CMU-1-Small-Region.svs"), backend=backend) as r:
            assert r.backend == backend
            assert r.dimensions == (2220, 2967)
            assert r.vendor == "aperio"
            mpp = resolve_mpp(r)
            assert mpp.mpp_um == pytest.approx(0.499)
            assert mpp.source.startswith("vendor:")

    def test_region_shape_dtype(self, backend):
        with open_slide(fixture_slide("CMU-1-Small-Region.svs"), backend=backend) as r:
            px = r.read_level_region(0, 100, 200, 300, 150)
            assert px.shape == (150, 300, 3) and px.dtype == np.uint8

    def test_tcga_has_no_mpp(self, backend):
        with open_slide(fixture_slide("tcga-cr-7395-01a-01-ts1.svs"), backend=backend) as r:
            assert len(r.levels) == 2
            with pytest.raises(MppMissingError, match="--slide-mpp"):
                resolve_mpp(r)
            assert resolve_mpp(r, override_mpp_um=0.25).source == "user"

    def test_synthetic_levels_and_mpp(self, backend, graded_slide):
        with open_slide(graded_slide, backend=backend) as r:
            assert len(r.levels) == 3
            assert resolve_mpp(r).mpp_um == pytest.approx(0.5)


def test_backends_give_identical_pixels_on_cmu():
    path = fixture_slide("CMU-1-Small-Region.svs")
    with open_slide(path, backend="openslide") as a, open_slide(path, backend="tiffslide") as b:
        pa = a.read_level_region(0, 0, 0, 2220, 2967)
        pb = b.read_level_region(0, 0, 0, 2220, 2967)
    assert np.array_equal(pa, pb)


def test_backends_identical_on_every_synthetic_level(graded_slide):
    with open_slide(graded_slide, backend="openslide") as a, open_slide(graded_slide, backend="tiffslide") as b:
        for level in range(3):
            w, h = a.levels[level].width_px, a.levels[level].height_px
            box = (w // 3, h // 3, min(700, w // 2), min(500, h // 2))
            assert np.array_equal(a.read_level_region(level, *box), b.read_level_region(level, *box)), level


def test_flat_tiff_openslide_refuses_tiffslide_opens():
    path = fixture_slide("kidney-48-5.tif")
    with pytest.raises(SlideOpenError, match="kidney-48-5.tif"):
        open_slide(path, backend="openslide")
    with open_slide(path, backend="auto") as r:
        assert r.backend == "tiffslide"
        assert r.dimensions == (1493, 901)
        with pytest.raises(MppMissingError):
            resolve_mpp(r)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(SlideNotFoundError, match="no such file"):
        open_slide(tmp_path / "nope.svs")
    with pytest.raises(SlideNotFoundError, match="directory"):
        open_slide(tmp_path)


def test_zero_byte_truncated_and_non_slide_files(tmp_path):
    empty = tmp_path / "empty.svs"
    empty.write_bytes(b"")
    with pytest.raises(SlideOpenError, match="empty"):
        open_slide(empty)
    src = fixture_slide("CMU-1-Small-Region.svs").read_bytes()
    truncated = tmp_path / "truncated.svs"
    truncated.write_bytes(src[: len(src) // 3])
    with pytest.raises(SlideOpenError, match="truncated.svs"):
        open_slide(truncated)
    from PIL import Image

    jpeg = tmp_path / "photo.jpg"
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(jpeg)
    with pytest.raises(SlideOpenError, match="photo.jpg"):
        open_slide(jpeg)
    # one base class for callers that do not care which
    assert issubclass(SlideOpenError, WsiHer2Error) and issubclass(SlideOpenError, OSError)


def test_mpp_csv(tmp_path):
    table = tmp_path / "mpp.csv"
    table.write_text("slide,mpp\ntcga-cr-7395-01a-01-ts1.svs,0.2525\n")
    with open_slide(fixture_slide("tcga-cr-7395-01a-01-ts1.svs")) as r:
        info = resolve_mpp(r, mpp_table=read_mpp_csv(table), mpp_table_name=table.name)
    assert info.mpp_um == pytest.approx(0.2525) and info.source == "csv:mpp.csv"


def test_implausible_resolution_tags_are_not_an_mpp(tmp_path):
    import tifffile

    path = tmp_path / "screen.tif"
    data = np.full((512, 512, 3), 200, np.uint8)
    tifffile.imwrite(path, data, tile=(256, 256), resolution=(72, 72), resolutionunit="INCH")
    with open_slide(path, backend="tiffslide") as r:
        with pytest.raises(MppMissingError):
            resolve_mpp(r)
    good = tmp_path / "micro.tif"
    tifffile.imwrite(good, data, tile=(256, 256), resolution=(40000, 40000), resolutionunit="CENTIMETER")
    with open_slide(good, backend="tiffslide") as r:
        info = resolve_mpp(r)
    assert info.mpp_um == pytest.approx(0.25) and info.source in ("tiff:XResolution", "vendor:tiffslide.mpp-x")


# --- --mpp-csv: the slide's own row, never another file's -----------------------------------------
def _mpp_table(tmp_path, text):
    table = tmp_path / "meta" / "mpp.csv"
    table.parent.mkdir(exist_ok=True)
    table.write_text(text)
    return read_mpp_csv(table)


def _files(tmp_path, *names):
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"slide")
    return [tmp_path / n for n in names]


def test_mpp_csv_matches_the_resolved_path_first(tmp_path):
    a, b = _files(tmp_path, "a/slide.svs", "b/slide.svs")
    table = _mpp_table(tmp_path, f"slide,mpp\n{a},0.25\n../b/slide.svs,0.5\n")  # relative: from the CSV's folder
    assert table.lookup(a) == 0.25 and table.lookup(b) == 0.5


def test_mpp_csv_row_of_another_existing_file_is_not_this_slides(tmp_path):
    mine, _ = _files(tmp_path, "a/slide.svs", "elsewhere/x/slide.svs")
    table = _mpp_table(tmp_path, "slide,mpp\n../elsewhere/x/slide.svs,0.25\n")
    assert table.lookup(mine) is None


def test_mpp_csv_unique_base_name_matches_with_a_log_note(tmp_path, caplog):
    (mine,) = _files(tmp_path, "a/slide.svs")
    for written in ("slide.svs", "slide", "/scanner/export/slide.svs"):  # bare name, stem, a path from elsewhere
        table = _mpp_table(tmp_path, f"slide,mpp\n{written},0.25\nother.svs,0.5\n")
        with caplog.at_level("INFO", logger="wsi_her2.slide.mpp"):
            assert table.lookup(mine) == 0.25
        assert "matched by the base name" in caplog.text
        caplog.clear()


@pytest.mark.parametrize("rows", ["slide.svs,0.25\n/nowhere/slide.svs,0.5\n", "slide.svs,0.25\nslide.svs,0.5\n",
                                  "../a/slide.svs,0.25\n../a/slide.svs,0.5\n"])
def test_mpp_csv_ambiguous_rows_are_refused_in_one_line(tmp_path, rows):
    from wsi_her2.errors import ConfigError

    (mine,) = _files(tmp_path, "a/slide.svs")
    table = _mpp_table(tmp_path, "slide,mpp\n" + rows)
    with pytest.raises(ConfigError, match=r"2 rows could give the MPP of .*slide.svs.*full path") as err:
        table.lookup(mine)
    assert "\n" not in str(err.value)


def test_tile_ignores_another_slides_row_in_mpp_csv(tmp_path):
    """The issue's case: a row for ../../elsewhere/x/slide.svs changed the MPP of a different slide.svs."""
    import shutil

    from wsi_her2.store.patch_store import open_store
    from wsi_her2.synthetic.slides import graded_ihc_spec, write_synthetic_slide
    from wsi_her2.tile.pipeline import TileConfig, tile_slide

    (tmp_path / "a").mkdir()
    mine = write_synthetic_slide(tmp_path / "a" / "slide.svs", graded_ihc_spec(block_px=448, grades=(2,), dust=False))
    (tmp_path / "elsewhere" / "x").mkdir(parents=True)
    shutil.copy(mine, tmp_path / "elsewhere" / "x" / "slide.svs")
    table = tmp_path / "meta" / "deep" / "mpp.csv"
    table.parent.mkdir(parents=True)
    table.write_text("slide,mpp\n../../elsewhere/x/slide.svs,1.0\n")
    store = tile_slide(mine, tmp_path / "out", config=TileConfig(workers=1, mpp_csv=str(table))).store
    slide = open_store(store).attrs["slide"]
    assert slide["mpp_um"] == pytest.approx(0.5) and slide["mpp_source"].startswith("vendor")
