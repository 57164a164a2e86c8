"""Nothing silently wrong: a store's attributes and a scored slide's outputs carry digests that
`wsi-her2 verify` and `score` check; damage is one line with the fix, damaged outputs are rebuilt."""
from __future__ import annotations

import json
import logging
import shutil

import pytest

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


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err)
    return err[0]


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
    line = _one_line_error(capsys)
    assert str(store_copy) in line and "wsi-her2 tile" in line and "--overwrite" in line
    assert main(["score", str(store_copy), "-q"]) == 1
    assert "damaged patch store" in _one_line_error(capsys)
    with pytest.raises(StoreError, match="damaged"):
        score_store(store_copy)


def test_store_without_an_attribute_digest_still_opens_with_a_log_line(store_copy, caplog):
    _edit_attrs(store_copy, lambda m: m.pop(ATTRS_DIGEST_KEY))
    with caplog.at_level(logging.INFO, logger="wsi_her2.store.patch_store"):
        assert verify_store(store_copy).n_tiles == open_store(store_copy).n_tiles > 0
    assert "carry no digest" in caplog.text
