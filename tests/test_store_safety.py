"""Damaged stores are refused, user files are never removed, killed runs are repaired, stores are keyed
by slide and settings, and one tile run writes a store at a time (issue: never a wrong answer from
a damaged input, never a user's file deleted)."""
from __future__ import annotations

import json
import os
import shutil
import stat

import numpy as np
import pytest
from conftest import one_line_error

from wsi_her2.cli import main
from wsi_her2.errors import StoreError
from wsi_her2.store.patch_store import QC_ARRAYS, PatchStore, open_store
from wsi_her2.store.verify import verify_store
from wsi_her2.tile.pipeline import TileConfig, tile_slide

CONFIG = TileConfig(workers=1, codec="zstd")


@pytest.fixture(scope="module")
def clean_store(graded_slide, tmp_path_factory):
    return tile_slide(graded_slide, tmp_path_factory.mktemp("clean"), config=CONFIG).store


@pytest.fixture
def store_copy(clean_store, tmp_path):
    dst = tmp_path / "out" / clean_store.name
    shutil.copytree(clean_store, dst)
    return dst


# --- damaged stores -------------------------------------------------------------------------------
def test_clean_store_verifies(clean_store, capsys):
    rep = verify_store(clean_store)
    assert rep.n_checksummed == rep.n_chunks == 4 + 8 + 1 + 3  # tiles, per-tile arrays, unit_done, images
    assert main(["verify", str(clean_store)]) == 0
    assert "ok" in capsys.readouterr().out


@pytest.mark.parametrize("damage", ["delete_tile_chunk", "truncate_tile_chunk", "random_bytes", "delete_qc_flags",
                                    "delete_coords_chunk", "flip_one_bit"])
def test_damaged_store_is_refused_with_one_line(store_copy, damage, capsys):
    from wsi_her2.score.pipeline import score_store

    chunk = store_copy / "tiles" / "c" / "1" / "0" / "0" / "0"
    if damage == "delete_tile_chunk":
        chunk.unlink()
    elif damage == "truncate_tile_chunk":
        chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])
    elif damage == "random_bytes":
        chunk.write_bytes(np.random.default_rng(0).bytes(chunk.stat().st_size))
    elif damage == "delete_qc_flags":
        shutil.rmtree(store_copy / "qc_flags")
    elif damage == "delete_coords_chunk":
        (store_copy / "coords_level0" / "c" / "0" / "0").unlink()
    else:
        data = bytearray(chunk.read_bytes())
        data[len(data) // 3] ^= 0x10
        chunk.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="damaged patch store.*--overwrite"):
        verify_store(store_copy)
    assert main(["verify", str(store_copy)]) == 1
    line = one_line_error(capsys)
    assert str(store_copy) in line and "wsi-her2 tile" in line and "--overwrite" in line
    with pytest.raises(StoreError, match="damaged"):
        score_store(store_copy)
    assert not (store_copy.parent / "graded.json").exists()  # nothing scored


def test_checksum_failure_on_read_is_a_store_error(store_copy):
    chunk = store_copy / "tiles" / "c" / "2" / "0" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:-10] + b"0123456789")
    store = open_store(store_copy)
    store.read_tiles(0, 64)  # undamaged chunk reads
    with pytest.raises(StoreError, match="damaged patch store.*tiles 128-191"):
        store.read_tiles(128, 192)


@pytest.mark.parametrize("codec", ["zstd", "lz4", "none", "jpeg"])
def test_directly_written_chunks_are_byte_identical_to_zarr(codec, tmp_path):
    """The tiler's own chunk files, checksum included, are exactly the bytes zarr writes."""
    rng = np.random.default_rng(3)
    tiles = rng.integers(0, 256, size=(8, 16, 16, 3), dtype=np.uint8)
    tiles[:, :8] = 90
    ours = PatchStore.create(tmp_path / "a.zarr", n_tiles=8, tile_px=16, chunk_tiles=4, codec=codec, attrs={},
                             per_tile={}, images={})
    writer = ours.chunk_writer()
    for unit in range(2):
        writer.write(unit, tiles[unit * 4 : unit * 4 + 4])
    theirs = PatchStore.create(tmp_path / "b.zarr", n_tiles=8, tile_px=16, chunk_tiles=4, codec=codec, attrs={},
                               per_tile={}, images={})
    theirs.write_tiles(0, tiles)
    for unit in range(2):
        key = f"tiles/c/{unit}/0/0/0"
        assert (tmp_path / "a.zarr" / key).read_bytes() == (tmp_path / "b.zarr" / key).read_bytes(), key
    assert "crc32c" in ours.tile_chunks().codecs


def test_every_array_carries_a_checksum(clean_store):
    store = open_store(clean_store)
    for name in ("tiles", "qc_flags", "coords_level0", "unit_done", "thumbnail", "tissue_mask"):
        assert any(c.to_dict()["name"] == "crc32c" for c in store._group[name].metadata.codecs), name


def test_all_zero_arrays_still_write_their_chunks(tmp_path):
    """zarr skips chunks equal to the fill value by default; a store must write them (missing = damage)."""
    store = PatchStore.create(tmp_path / "z.zarr", n_tiles=3, tile_px=8, chunk_tiles=4, codec="zstd", attrs={},
                              per_tile={"mask_fraction": np.zeros(3, np.float32)},
                              images={"tissue_mask": np.zeros((4, 4), bool)})
    store.write_qc({n: np.zeros(3, np.float32 if n != "qc_flags" else np.uint8) for n in
                    QC_ARRAYS}, np.zeros(1, bool))
    for name in ("mask_fraction/c/0", "qc_flags/c/0", "unit_done/c/0", "tissue_mask/c/0/0"):
        assert (tmp_path / "z.zarr" / name).is_file(), name


# --- user files are never removed; output paths are one-line errors --------------------------------
@pytest.mark.parametrize("overwrite", [False, True])
def test_foreign_directory_at_the_store_path_is_left_alone(graded_slide, tmp_path, overwrite, capsys):
    precious = tmp_path / "out" / "graded.zarr" / "precious.txt"
    precious.parent.mkdir(parents=True)
    precious.write_text("keep me")
    rc = main(["tile", str(graded_slide), "-o", str(tmp_path / "out"), "-q", "--workers", "1"]
              + (["--overwrite"] if overwrite else []))
    assert rc == 1 and precious.read_text() == "keep me"
    assert "not a wsi-her2 patch store" in one_line_error(capsys)


def test_foreign_file_at_the_store_path_and_out_at_a_file(graded_slide, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "graded.zarr").write_text("mine")
    assert main(["tile", str(graded_slide), "-o", str(tmp_path / "out"), "-q", "--overwrite"]) == 1
    assert (tmp_path / "out" / "graded.zarr").read_text() == "mine"
    assert "not a wsi-her2 patch store" in one_line_error(capsys)
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out in (afile, afile / "sub"):
        assert main(["tile", str(graded_slide), "-o", str(out), "-q"]) == 1
        assert "choose another -o" in one_line_error(capsys)
    assert afile.read_text() == "x"


def test_score_output_at_a_file_is_one_line(clean_store, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["score", str(clean_store), "-o", str(afile / "sub"), "-q"]) == 1
    assert "choose another -o" in one_line_error(capsys)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_unwritable_output_is_one_line(graded_slide, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    assert main(["tile", str(graded_slide), "-o", str(ro / "out"), "-q"]) == 1
    assert "permission denied" in one_line_error(capsys)


# --- a killed run is repaired by the next one --------------------------------------------------------
def test_slides_csv_row_is_restored_from_the_result_json(store_copy):
    from wsi_her2.score.pipeline import ScoreConfig, _parts_key, score_store

    out = store_copy.parent
    row = {"slide": "graded", "her2_score": "2+", "confidence": 0.9, "frac_0": 0.1, "frac_1+": 0.2, "frac_2+": 0.6,
           "frac_3+": 0.1, "tiles_used": 200, "tiles_rejected": 56, "model": "ihc_dab", "aggregation": "asco"}
    # the state a kill leaves between writing <id>.json and updating slides.csv
    (out / "graded.json").write_text(json.dumps({"call": {"her2_score": "2+"}, "row": row, "aggregation": "asco",
                                                  "model": {"name": "ihc_dab"}, "parts": _parts_key(ScoreConfig())}))
    res = score_store(store_copy, config=ScoreConfig())
    assert res.skipped
    text = (out / "slides.csv").read_text()
    assert text.splitlines()[1].startswith("graded,2+,0.9")
    score_store(store_copy, config=ScoreConfig())
    assert (out / "slides.csv").read_text() == text  # not duplicated


def test_left_over_temporary_files_are_cleaned(graded_slide, clean_store):
    from wsi_her2.score.pipeline import ScoreConfig, score_store

    out = clean_store.parent
    chunk_tmp = clean_store / "tiles" / "c" / "1" / "0" / "0" / ".0.4194301.140000.tmp"
    chunk_tmp.write_bytes(b"half a chunk")
    geo_tmp = out / f".graded.geojson.{os.uname().nodename.split('.')[0]}.{2**22 - 3}.1.tmp"
    geo_tmp.write_text("{")
    assert tile_slide(graded_slide, out, config=CONFIG).status == "skipped"
    assert not chunk_tmp.exists()
    (out / "graded.json").write_text(json.dumps({"call": {}, "row": {"slide": "graded"}, "aggregation": "asco",
                                                 "model": {"name": "ihc_dab"}}))
    score_store(clean_store, config=ScoreConfig())
    assert not geo_tmp.exists()
    (out / "graded.json").unlink()
    (out / "slides.csv").unlink()


def test_result_files_follow_the_umask(tmp_path):
    from wsi_her2.files import atomic_write_text
    from wsi_her2.outputs.tables import upsert_slides_csv

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        upsert_slides_csv(tmp_path / "slides.csv", [{"slide": "s"}])
    finally:
        os.umask(old)
    for name in ("a.json", "slides.csv"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name
    assert [p.name for p in tmp_path.iterdir()].count("slides.csv") == 1 and len(list(tmp_path.iterdir())) == 2


# --- stores keyed by slide and settings ---------------------------------------------------------------
def test_complete_store_with_other_settings_is_not_reused(graded_slide, store_copy):
    with pytest.raises(StoreError, match="other tiling settings.*--overwrite"):
        tile_slide(graded_slide, store_copy.parent, config=TileConfig(workers=1, codec="zstd", tile_px=256))
    assert tile_slide(graded_slide, store_copy.parent, config=CONFIG).status == "skipped"


def test_complete_store_from_another_file_is_not_reused(demo_slide, store_copy, tmp_path):
    other = tmp_path / "elsewhere" / "graded.svs"
    other.parent.mkdir()
    shutil.copy(demo_slide, other)  # another slide with the same name
    with pytest.raises(StoreError, match="another slide file.*--overwrite"):
        tile_slide(other, store_copy.parent, config=CONFIG)


def test_two_inputs_with_one_name_are_one_error(graded_slide, tmp_path, capsys):
    other = tmp_path / "b" / "graded.svs"
    other.parent.mkdir()
    shutil.copy(graded_slide, other)
    assert main(["tile", str(graded_slide), str(other), "-o", str(tmp_path / "out"), "-q"]) == 2
    assert "would both be written to graded.zarr" in one_line_error(capsys)
    assert not (tmp_path / "out").exists()


# --- one run per store ------------------------------------------------------------------------------
def test_second_run_on_a_locked_store_exits_with_a_clear_line(graded_slide, store_copy, capsys):
    from wsi_her2.locks import store_lock

    with store_lock(store_copy):  # another run (here: this process) is writing the store
        with pytest.raises(StoreError, match="another wsi-her2 run.*is writing this store"):
            tile_slide(graded_slide, store_copy.parent, config=CONFIG)
        assert main(["tile", str(graded_slide), "-o", str(store_copy.parent), "-q"]) == 1
        assert "is writing this store" in one_line_error(capsys)
    assert not (store_copy.parent / "graded.zarr.lock").exists()
    assert tile_slide(graded_slide, store_copy.parent, config=CONFIG).status == "skipped"
