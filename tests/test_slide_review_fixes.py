"""Slide reading, tiling and store details: chroma factors that say "unknown" rather than guess, levels
matched by size, handles closed on refusal, the MPP table read once, older stores pointed at --overwrite."""
from __future__ import annotations

import io
import logging

import numpy as np
import pytest
from PIL import Image

from wsi_her2.errors import OutputError, SlideOpenError
from wsi_her2.slide.chroma import jpeg_chroma_factor, level_chroma_factors
from wsi_her2.synthetic.image_slide import write_image_slide
from wsi_her2.tile.geometry import choose_geometry


def _jpeg(subsampling: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 180, np.uint8)).save(out, "JPEG", quality=90, subsampling=subsampling)
    return out.getvalue()


def _level_sizes(path) -> list[tuple[int, int]]:
    from wsi_her2.slide import open_slide

    with open_slide(path) as reader:
        return [(lv.width_px, lv.height_px) for lv in reader.levels]


# --- chroma factors ------------------------------------------------------------------------------------
def test_a_jpeg_without_a_frame_header_is_unknown_not_full_colour():
    assert jpeg_chroma_factor(_jpeg(2)) == 2 and jpeg_chroma_factor(_jpeg(0)) == 1
    assert jpeg_chroma_factor(b"") is None
    assert jpeg_chroma_factor(_jpeg(2)[:20]) is None  # cut before its frame header


def test_an_empty_first_tile_is_passed_over_for_the_first_written_one(tmp_path):
    import tifffile

    slide = write_image_slide(np.full((1024, 1024, 3), 200, np.uint8), tmp_path / "s.svs", mpp_um=0.25)
    with tifffile.TiffFile(slide, mode="r+b") as tif:
        counts = tif.pages[0].tags["TileByteCounts"]
        counts.overwrite((0, *counts.value[1:]))  # a tile never written, as sparse scans have
    assert level_chroma_factors(slide, 1) == [2]


def test_levels_are_matched_by_size_and_an_unlisted_one_is_unknown(tmp_path):
    slide = write_image_slide(np.full((1024, 1024, 3), 200, np.uint8), tmp_path / "s.svs", mpp_um=0.25,
                              jpeg_rgb=True)
    sizes = _level_sizes(slide)
    assert len(sizes) == 2
    assert level_chroma_factors(slide, sizes) == [1, 1]
    assert level_chroma_factors(slide, [sizes[1], (999, 999), sizes[0]]) == [1, None, 1]


def test_a_file_no_reader_of_headers_knows_is_unknown(tmp_path):
    path = tmp_path / "slide.mrxs"
    path.write_bytes(b"not a tiff")
    assert level_chroma_factors(path, [(100, 100), (50, 50)]) == [None, None]


def test_an_unknown_factor_is_recorded_and_counts_as_full_colour():
    kw = dict(level_dims=[(4000, 4000), (1000, 1000)], level_downsamples=[1.0, 4.0], slide_mpp_um=0.25,
              target_mpp_um=1.0, tile_px=112)
    g = choose_geometry(**kw, level_chroma=[None, None])
    assert g.level == 1 and g.chroma_factor is None
    # the colour is no finer than the pixels: the scorer corrects for the pixel size alone, as for full colour
    assert g.chroma_mpp_um == pytest.approx(1.0) == choose_geometry(**kw, level_chroma=[1, 1]).chroma_mpp_um
    assert g.to_dict()["chroma_factor"] is None


# --- open_slide closes what it refuses --------------------------------------------------------------------
def test_a_reader_whose_pixels_are_unreadable_is_closed(tmp_path, monkeypatch):
    import wsi_her2.slide as slide_mod
    from wsi_her2.slide.tiffslide_reader import TiffSlideReader

    slide = write_image_slide(np.full((512, 512, 3), 200, np.uint8), tmp_path / "s.svs", mpp_um=0.25)
    closed = []
    real_close = TiffSlideReader.close
    monkeypatch.setattr(TiffSlideReader, "close", lambda self: closed.append(self) or real_close(self))
    monkeypatch.setattr(slide_mod, "_check_readable", lambda reader: (_ for _ in ()).throw(ValueError("bad tile")))
    with pytest.raises(SlideOpenError, match="bad tile"):
        slide_mod.open_slide(slide, backend="tiffslide")
    assert len(closed) == 1


# --- the MPP table -----------------------------------------------------------------------------------------
def test_the_mpp_table_is_read_once_per_version_of_the_file(tmp_path):
    from wsi_her2.slide.mpp import read_mpp_csv

    table = tmp_path / "mpp.csv"
    table.write_text("slide,mpp\na.svs,0.25\n")
    first = read_mpp_csv(table)
    assert read_mpp_csv(table) is first
    assert first.lookup(tmp_path / "elsewhere" / "a.svs") == 0.25
    table.write_text("slide,mpp\na.svs,0.5\nb.svs,0.26\n")
    assert read_mpp_csv(table).lookup(tmp_path / "a.svs") == 0.5  # edited: read again


# --- tiling ----------------------------------------------------------------------------------------------
def test_a_store_tiled_before_colour_was_recorded_is_reused_with_a_warning(graded_slide, tmp_path, monkeypatch, caplog):
    import wsi_her2.tile.pipeline as pipeline
    from wsi_her2.store.patch_store import PatchStore
    from wsi_her2.tile.pipeline import TileConfig, tile_slide

    stats = []
    real_stat = pipeline.slide_stat
    monkeypatch.setattr(pipeline, "slide_stat", lambda path: stats.append(path) or real_stat(path))
    config = TileConfig(workers=1, qc_png=False)
    store_path = tile_slide(graded_slide, tmp_path, config=config).store
    assert len(stats) == 1  # the slide's size and time, taken once for the record
    with caplog.at_level(logging.WARNING, logger="wsi_her2.tile.pipeline"):
        assert tile_slide(graded_slide, tmp_path, config=config).status == "skipped"
    assert "--overwrite" not in caplog.text  # recorded: nothing to say

    store = PatchStore.open(store_path, mode="r+")
    tiling = {k: v for k, v in store.attrs["tiling"].items() if k != "chroma_mpp_um"}
    store.update_attrs(tiling=tiling)  # as an older wsi-her2 wrote it
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="wsi_her2.tile.pipeline"):
        assert tile_slide(graded_slide, tmp_path, config=config).status == "skipped"
    assert "--overwrite" in caplog.text and store_path.name in caplog.text


# --- files ----------------------------------------------------------------------------------------------
def test_a_folder_given_as_an_output_file_names_no_particular_file(tmp_path):
    from wsi_her2.files import prepare_output_file

    with pytest.raises(OutputError, match="is a folder, not a file") as err:
        prepare_output_file(tmp_path, what="report")
    assert ".json" not in str(err.value)
