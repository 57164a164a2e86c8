"""Score stage end to end: planted grades recovered, planted slide call, every output written."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from wsi_her2.score.pipeline import ScoreConfig, score_store
from wsi_her2.store.patch_store import open_store
from wsi_her2.tile.pipeline import TileConfig, tile_slide


@pytest.fixture(scope="module")
def graded_scored(graded_slide, tmp_path_factory):
    out = tmp_path_factory.mktemp("graded-score")
    store = tile_slide(graded_slide, out, config=TileConfig(workers=1)).store
    res = score_store(store, config=ScoreConfig(agg="vote"))
    return store, res


def test_tile_calls_recover_planted_grades(graded_scored):
    from wsi_her2.synthetic.slides import graded_ihc_spec

    store_path, res = graded_scored
    table = pd.read_parquet(store_path.parent / "graded.tiles.parquet")
    store = open_store(store_path)
    size = store.tile_size_level0
    for region in graded_ihc_spec().regions:
        inside = (
            (table.x_level0 >= region.x_px) & (table.x_level0 + size <= region.x_px + region.w_px)
            & (table.y_level0 >= region.y_px) & (table.y_level0 + size <= region.y_px + region.h_px)
        )
        calls = table.loc[inside, "call"]
        planted = ("0", "1+", "2+", "3+")[region.grade]
        agreement = (calls == planted).mean()
        assert agreement >= 0.9, f"grade {planted}: only {agreement:.0%} of tiles called {planted}"


def test_outputs_written_and_consistent(graded_scored):
    store_path, res = graded_scored
    out = store_path.parent
    for name in ("graded.geojson", "graded.tiles.parquet", "graded.json", "graded.heatmap.png", "slides.csv"):
        assert (out / name).is_file(), name
    meta = json.loads((out / "graded.json").read_text())
    assert meta["call"]["her2_score"] == res.call.her2_score
    assert meta["model"]["name"] == "ihc_dab"
    rows = pd.read_csv(out / "slides.csv", dtype=str)
    assert list(rows.slide) == ["graded"] and rows.her2_score[0] == res.call.her2_score
    table = pd.read_parquet(out / "graded.tiles.parquet")
    assert len(table) == open_store(store_path).n_tiles
    assert {"p_0", "p_1+", "p_2+", "p_3+", "dab_od_membrane", "completeness", "laplacian_var", "sharpness", "tumour_cell_count"} <= set(table.columns)
    probs = table[["p_0", "p_1+", "p_2+", "p_3+"]].to_numpy()
    scored = table.qc_pass.to_numpy()
    assert np.allclose(probs[scored].sum(axis=1), 1.0, atol=1e-4)
    assert np.isnan(probs[~scored]).all()
    # the QC tissue fraction (which decided each tile's fate) is there for every tile, rejected
    # ones too; the scorer's own OD-based one sits beside it under another name
    assert np.array_equal(table.tissue_fraction.to_numpy(), open_store(store_path).array("tissue_fraction"))
    assert np.isnan(table.scorer_tissue_fraction.to_numpy()[~scored]).all()
    # a second run is a no-op unless asked
    again = score_store(store_path, config=ScoreConfig(agg="vote"))
    assert again.skipped


def test_demo_slide_gets_planted_call_with_every_aggregator(demo_slide, tmp_path):
    from wsi_her2.score.aggregate import AGGREGATORS
    from wsi_her2.synthetic.slides import DEMO_PLANTED_SCORE

    planted = ("0", "1+", "2+", "3+")[DEMO_PLANTED_SCORE]
    out = tmp_path / "demo-score"
    store = tile_slide(demo_slide, out, config=TileConfig(workers=1)).store
    res = score_store(store, config=ScoreConfig(agg="asco"))
    assert res.call.her2_score == planted
    table = pd.read_parquet(out / "demo.tiles.parquet")
    probs = table.loc[table.qc_pass, ["p_0", "p_1+", "p_2+", "p_3+"]].to_numpy()
    for name, aggregate in AGGREGATORS.items():
        assert aggregate(probs).her2_score == planted, name
    assert AGGREGATORS["asco"](probs[:5]).her2_score == "indeterminate"
    # rejected tiles are kept, with reasons, in the QuPath file
    fc = json.loads((out / "demo.geojson").read_text())
    rejected = [f for f in fc["features"] if f["properties"].get("classification", {}).get("name") == "QC rejected"]
    assert rejected and all(f["properties"]["metadata"]["qc_reason"] for f in rejected)


def test_model_trained_at_other_mpp_is_refused(graded_scored):
    from wsi_her2.errors import ConfigError
    from wsi_her2.models import create_model

    store_path, _ = graded_scored
    model = create_model("resnet18", mpp_um=1.0)
    with pytest.raises(ConfigError, match="re-tile"):
        score_store(store_path, out_dir=store_path.parent / "mismatch", config=ScoreConfig(model="resnet18"), model=model)


def test_cli_score_reports_missing_store(tmp_path, capsys):
    from wsi_her2.cli import main

    rc = main(["score", str(tmp_path / "nothing.zarr")])
    err = capsys.readouterr().err
    assert rc == 1 and "nothing.zarr" in err and "Traceback" not in err


def test_agg_choices_match_aggregators():
    from wsi_her2.score.aggregate import AGGREGATORS
    from wsi_her2.cli.score import AGG_CHOICES

    assert set(AGG_CHOICES) == set(AGGREGATORS)


def test_the_command_line_default_model_is_the_score_stage_s():
    from wsi_her2.cli.score import DEFAULT_MODEL_NAME
    from wsi_her2.score.scorer import DEFAULT_MODEL

    assert DEFAULT_MODEL_NAME == DEFAULT_MODEL


def test_explain_writes_saliency_overlay_and_measurement(tmp_path):
    from conftest import fixture_slide
    from wsi_her2.models import create_model, save_model

    slide = fixture_slide("CMU-1-Small-Region.svs")
    # 2 µm/px keeps it to a handful of tiles (some pass QC, some not): Grad-CAM++ on CPU costs per tile
    store = tile_slide(slide, tmp_path, config=TileConfig(workers=1, target_mpp_um=2.0)).store
    weights = save_model(create_model("resnet18", mpp_um=2.0), tmp_path / "r18.safetensors")
    res = score_store(store, config=ScoreConfig(model=str(weights), agg="vote", explain="gradcam++", min_tiles=1))
    assert (tmp_path / "CMU-1-Small-Region.saliency.png").is_file()
    table = pd.read_parquet(tmp_path / "CMU-1-Small-Region.tiles.parquet")
    sal = table.saliency_mean.to_numpy()
    assert table.qc_pass.any() and not table.qc_pass.all()
    assert np.isfinite(sal[table.qc_pass]).all() and np.isnan(sal[~table.qc_pass]).all()
    assert ((sal[table.qc_pass] >= 0) & (sal[table.qc_pass] <= 1)).all()
    assert res.row["model"] == "r18.safetensors"


def test_explain_refused_for_rule_based_scorer(graded_scored):
    from wsi_her2.errors import ConfigError

    store_path, _ = graded_scored
    with pytest.raises(ConfigError, match="rule-based"):
        score_store(store_path, out_dir=store_path.parent / "x", config=ScoreConfig(explain="gradcam"))


def test_console_script_returns_mains_code_and_readies_a_quick_exit(monkeypatch):
    """``wsi-her2`` is cli.entry: main's exit code, then gc.freeze() (exit after torch: 0.6 s -> 0.2 s)."""
    import gc

    from wsi_her2 import cli

    frozen = []
    monkeypatch.setattr(cli, "main", lambda argv=None: 3)
    monkeypatch.setattr(gc, "freeze", lambda: frozen.append(True))
    assert cli.entry() == 3 and frozen == [True]


def _readme_result_keys() -> set[str]:
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    table = readme[readme.index("#### `<id>.json`: the slide's result"):]
    table = table[table.index("| key |"):].split("\n\n")[0]
    return {k for line in table.splitlines()[2:] for k in re.findall(r"`([a-z_0-9]+)`", line.split("|")[1])}


def test_score_store_returns_the_result_its_json_records(graded_scored):
    """The returned SlideResult is what <id>.json holds (SlideResult.from_record reads it back), and every key is in
    the README's table of the schema."""
    from wsi_her2.outputs.manifest import OUTPUT_FILES_KEY, RESULT_DIGEST_KEY
    from wsi_her2.result import SCHEMA_VERSION, SlideResult

    store_path, res = graded_scored
    meta = json.loads((store_path.parent / "graded.json").read_text())
    assert meta["schema_version"] == SCHEMA_VERSION and list(meta)[0] == "schema_version"
    recorded = {k: v for k, v in meta.items() if k not in (OUTPUT_FILES_KEY, RESULT_DIGEST_KEY)}
    assert res.to_record() == recorded
    again = SlideResult.from_record(meta)
    assert again == res and again.to_record() == recorded and again.tiles is None
    assert res.tumour is not None and res.row["tumour_cells"] == res.tumour.cells
    assert res.call.percentages is None and res.call.method == "vote"  # tile votes: no tumour-cell percentages
    assert res.tiles.calls.shape == (open_store(store_path).n_tiles,) and not res.tiles.calls.flags.writeable
    with pytest.raises(TypeError, match="read-only"):
        res.call.details["reason"] = "edited"
    documented = _readme_result_keys()
    assert set(meta) <= documented
    assert documented - set(meta) == {"cores", "regions", "slide_path", "no_tissue"}


def test_options_a_scorer_cannot_serve_are_refused_by_its_capabilities(graded_scored):
    """--cells, --explain and --calibration are asked of the model's capabilities before any work, whatever its name."""
    from wsi_her2.errors import ConfigError
    from wsi_her2.score.pipeline import validate_score_config

    with pytest.raises(ConfigError, match="--cells: resnet18 reports no cells"):
        validate_score_config(ScoreConfig(model="resnet18", cells=True))
    with pytest.raises(ConfigError, match="--calibration: resnet18 takes no lab calibration"):
        validate_score_config(ScoreConfig(model="resnet18", calibration="cal.json"))
    assert validate_score_config(ScoreConfig(model="resnet18", explain="gradcam")) is None
    assert validate_score_config(ScoreConfig(cells=True)) is None
