"""Nothing silently wrong: a store's attributes and a scored slide's outputs carry digests that
`wsi-her2 verify` and `score` check; damage is one line with the fix, damaged outputs are rebuilt."""
from __future__ import annotations

import json
import logging
import shutil

import pytest
from conftest import one_line_error

from wsi_her2.cli import main
from wsi_her2.errors import StoreError
from wsi_her2.store.patch_store import ATTRS_DIGEST_KEY, open_store
from wsi_her2.store.verify import verify_store


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    from wsi_her2.synthetic.slides import graded_ihc_spec, write_synthetic_slide
    from wsi_her2.tile.pipeline import TileConfig, tile_slide

    d = tmp_path_factory.mktemp("integrity")
    slide = write_synthetic_slide(d / "tiny.svs", graded_ihc_spec(block_px=448, grades=(1, 3), dust=False))
    return tile_slide(slide, d / "clean", config=TileConfig(workers=1)).store


@pytest.fixture
def store_copy(tiny_store, tmp_path):
    dst = tmp_path / "out" / tiny_store.name
    shutil.copytree(tiny_store, dst)
    return dst


def _edit_attrs(store_path, edit) -> None:
    meta_path = store_path / "zarr.json"
    meta = json.loads(meta_path.read_text())
    edit(meta["attributes"]["wsi_her2"])
    meta_path.write_text(json.dumps(meta, indent=2))


# --- store attributes ------------------------------------------------------------------------------
def test_store_attributes_carry_their_digest(tiny_store):
    assert len(open_store(tiny_store).attrs[ATTRS_DIGEST_KEY]) == 64


@pytest.mark.parametrize("edit", [
    lambda m: m["slide"].update(mpp_um=0.4),  # the case: 0.5 -> 0.4 gave 18,133 tumour cells, not 29,290
    lambda m: m["tiling"].update(tile_size_level0=m["tiling"]["tile_size_level0"] + 1),
    lambda m: m["qc"].update(min_tissue_fraction=0.1),
    lambda m: m["slide"].update(sha256="0" * 64),
])
def test_edited_store_attributes_are_damage_with_the_fix(store_copy, edit, capsys):
    from wsi_her2.score.pipeline import score_store

    _edit_attrs(store_copy, edit)
    with pytest.raises(StoreError, match="damaged patch store.*attributes.*--overwrite"):
        verify_store(store_copy)
    assert main(["verify", str(store_copy)]) == 1
    line = one_line_error(capsys)
    assert str(store_copy) in line and "wsi-her2 tile" in line and "--overwrite" in line
    assert main(["score", str(store_copy), "-q"]) == 1
    assert "damaged patch store" in one_line_error(capsys)
    with pytest.raises(StoreError, match="damaged"):
        score_store(store_copy)


def test_store_without_an_attribute_digest_still_opens_with_a_log_line(store_copy, caplog):
    _edit_attrs(store_copy, lambda m: m.pop(ATTRS_DIGEST_KEY))
    with caplog.at_level(logging.INFO, logger="wsi_her2.store.patch_store"):
        assert verify_store(store_copy).n_tiles == open_store(store_copy).n_tiles > 0
    assert "carry no digest" in caplog.text


# --- scored outputs --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scored_dir(tiny_store, tmp_path_factory):
    from wsi_her2.score.pipeline import ScoreConfig, score_store

    out = tmp_path_factory.mktemp("scored")
    shutil.copytree(tiny_store, out / tiny_store.name)
    score_store(out / tiny_store.name, config=ScoreConfig(min_tiles=1))
    return out


@pytest.fixture
def scored_copy(scored_dir, tmp_path):
    dst = tmp_path / "scored"
    shutil.copytree(scored_dir, dst)
    return dst


def _record(folder):
    return json.loads((folder / "tiny.json").read_text())


def test_result_records_every_output_digest_and_its_own(scored_dir, capsys):
    from wsi_her2.digests import record_sha256, sha256_file
    from wsi_her2.outputs.manifest import OUTPUT_FILES_KEY, RESULT_DIGEST_KEY

    record = _record(scored_dir)
    files = record[OUTPUT_FILES_KEY]
    assert set(files) == {"tiny.tiles.parquet", "tiny.geojson", "tiny.heatmap.png", "tiny.report.html", "tiny.report.pdf"}
    for name, entry in files.items():
        assert entry == {"sha256": sha256_file(scored_dir / name), "bytes": (scored_dir / name).stat().st_size}
    assert record[RESULT_DIGEST_KEY] == record_sha256({k: v for k, v in record.items() if k != RESULT_DIGEST_KEY})
    assert main(["verify", str(scored_dir)]) == 0
    out = capsys.readouterr().out
    assert "tiny.zarr: ok" in out and "tiny.json: ok, 5 output files match" in out


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


DAMAGE = {
    "flip_a_parquet_byte": ("tiny.tiles.parquet", lambda d: _flip_byte(d / "tiny.tiles.parquet")),
    "delete_the_geojson": ("tiny.geojson is missing", lambda d: (d / "tiny.geojson").unlink()),
    "truncate_the_heatmap": ("tiny.heatmap.png", lambda d: (d / "tiny.heatmap.png").write_bytes(b"\x89PNG")),
    "edit_the_call_in_the_json": ("tiny.json does not match its SHA-256", lambda d: (d / "tiny.json").write_text(
        (d / "tiny.json").read_text().replace('"her2_score": "', '"her2_score": "3+', 1))),
    "json_cut_short": ("tiny.json unreadable", lambda d: (d / "tiny.json").write_text((d / "tiny.json").read_text()[:99])),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_outputs_are_reported_by_verify_and_rebuilt_by_score(scored_copy, scored_dir, damage, capsys, caplog):
    from wsi_her2.outputs.manifest import OUTPUT_FILES_KEY

    what, do = DAMAGE[damage]
    do(scored_copy)
    assert main(["verify", str(scored_copy)]) == 1
    line = one_line_error(capsys)
    assert "tiny.json: damaged outputs" in line and what in line and f"wsi-her2 score {scored_copy}" in line
    with caplog.at_level(logging.WARNING, logger="wsi_her2.score.pipeline"):
        assert main(["score", str(scored_copy / "tiny.zarr"), "--min-tiles", "1", "-q"]) == 0
    assert "(already scored)" not in capsys.readouterr().out
    assert "earlier outputs missing or damaged" in caplog.text and what in caplog.text
    assert main(["verify", str(scored_copy)]) == 0
    # rebuilt to what the undamaged run wrote
    assert _record(scored_copy)[OUTPUT_FILES_KEY] == _record(scored_dir)[OUTPUT_FILES_KEY]
    assert (scored_copy / "slides.csv").read_bytes() == (scored_dir / "slides.csv").read_bytes()


@pytest.mark.parametrize("edit", ["delete", "change"])
def test_the_slides_csv_row_is_checked_and_restored(scored_copy, scored_dir, edit, capsys):
    table = scored_copy / "slides.csv"
    lines = table.read_text().splitlines(keepends=True)
    table.write_text(lines[0] if edit == "delete" else lines[0] + lines[1].replace("tiny,", "tiny,3+", 1))
    assert main(["verify", str(scored_copy)]) == 1
    assert "the rows of tiny in slides.csv" in one_line_error(capsys)
    assert main(["score", str(scored_copy), "--min-tiles", "1", "-q"]) == 0
    assert "(already scored)" in capsys.readouterr().out  # outputs intact: only the row is put back
    assert table.read_bytes() == (scored_dir / "slides.csv").read_bytes()
    assert main(["verify", str(scored_copy / "tiny.zarr")]) == 0


def test_result_json_never_holds_infinity(tmp_path):
    from wsi_her2.outputs.manifest import write_result_json

    record = write_result_json(tmp_path / "x.json", {"a": float("inf"), "b": [float("nan"), 1.5], "outputs": {}})
    text = (tmp_path / "x.json").read_text()
    assert record["a"] is None and "Infinity" not in text and "NaN" not in text
    assert json.loads(text)["b"] == [None, 1.5]


def test_the_regions_csv_rows_are_checked_and_rebuilt(scored_copy, capsys):
    square = [[448, 448], [896, 448], [896, 896], [448, 896], [448, 448]]
    roi = scored_copy / "roi.geojson"
    roi.write_text(json.dumps([{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [square]},
                                "properties": {"name": "=block", "classification": {"name": "Tumor"}}}]))
    args = ["score", str(scored_copy / "tiny.zarr"), "--roi", str(roi), "--min-tiles", "1", "-q"]
    assert main(args) == 0
    regions = scored_copy / "regions.csv"
    good = regions.read_bytes()
    assert b"'=block" in good  # neutralised (CSV injection), and still matched to its record
    assert main(["verify", str(scored_copy)]) == 0
    regions.write_bytes(good.replace(b"'=block,not called,", b"'=block,not called,3+", 1))
    assert main(["verify", str(scored_copy)]) == 1
    assert "the rows of tiny in regions.csv differ from its record" in one_line_error(capsys)
    assert main(args) == 0
    assert "(already scored)" not in capsys.readouterr().out and regions.read_bytes() == good
    regions.unlink()  # a deleted table is damage too: verify says so and score rebuilds it
    assert main(["verify", str(scored_copy)]) == 1
    assert "regions.csv is missing" in one_line_error(capsys)
    assert main(args) == 0 and regions.read_bytes() == good


@pytest.mark.parametrize("content", [b"slide,her2_score\n\xff\xfe not utf-8\n", b"slide,her2_score\ntiny,\"" + b"x" * 200_000 + b"\"\n"],
                         ids=["not_utf8", "field_over_the_csv_limit"])
def test_verify_reports_an_unreadable_slides_csv_in_one_line(scored_copy, content, capsys):
    (scored_copy / "slides.csv").write_bytes(content)
    assert main(["verify", str(scored_copy)]) == 1
    line = one_line_error(capsys)
    assert "tiny.json: damaged outputs" in line and "slides.csv unreadable" in line
