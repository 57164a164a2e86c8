"""One definition per fact: HER2 labels and agreement metrics are the same wherever they are used."""
from __future__ import annotations

import math
import subprocess
import sys

import pytest

from wsi_her2.errors import ConfigError
from wsi_her2.metrics import quadratic_weighted_kappa
from wsi_her2.vocab import HER2_CLASSES, parse_her2_label


@pytest.mark.parametrize("raw,expected", [
    ("3", "3+"), (3, "3+"), ("3+", "3+"), ("3plus", "3+"), ("HER2_3+", "3+"), ("HER2: 2+", "2+"),
    ("score 2+", "2+"), (" 1+ ", "1+"), ("0+", "0"), ("0", "0"), ("2.0", "2+"), ("", None), ("NA", None),
])
def test_every_reader_of_labels_accepts_the_same_spellings(raw, expected):
    from wsi_her2.batch.manifest import parse_her2_label as manifest_parser
    from wsi_her2.train.data import normalise_label

    assert parse_her2_label(raw) == expected
    assert manifest_parser is parse_her2_label  # the cohort manifest uses this very function
    if expected is not None:
        assert normalise_label(str(raw)) == expected  # and so do training datasets


def test_bad_label_is_one_clear_error():
    with pytest.raises(ConfigError, match="not a HER2 score"):
        parse_her2_label("4+")


def test_kappa_is_one_function_and_undefined_without_chance_disagreement():
    from wsi_her2.batch import report
    from wsi_her2.train import evaluate

    assert report.quadratic_weighted_kappa is quadratic_weighted_kappa is evaluate.quadratic_weighted_kappa
    assert math.isnan(quadratic_weighted_kappa([2, 2, 2], [2, 2, 2]))  # all one class: undefined
    assert quadratic_weighted_kappa([0, 1, 2, 3], [0, 1, 2, 3]) == pytest.approx(1.0)


def test_class_list_is_defined_once():
    from wsi_her2.models.config import HER2_CLASSES as model_classes
    from wsi_her2.models.ihc_score import CLASS_NAMES
    from wsi_her2.score.aggregate import HER2_CLASSES as agg_classes

    assert model_classes is agg_classes is CLASS_NAMES is HER2_CLASSES


def test_help_and_tile_stage_import_neither_torch_nor_timm():
    code = ("import sys, wsi_her2.cli as c, wsi_her2.tile.pipeline, wsi_her2.vocab, wsi_her2.metrics; "
            "c.build_parser(); print(sorted(m for m in ('torch', 'timm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_code_parses_as_the_oldest_python_pyproject_allows():
    """requires-python is true to the code: every module compiles with that version's grammar."""
    import ast
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    floor = re.search(r'requires-python = ">=3\.(\d+)"', (root / "pyproject.toml").read_text())
    minor = int(floor.group(1))
    for path in (root / "wsi_her2").rglob("*.py"):
        ast.parse(path.read_text(), filename=str(path), feature_version=(3, minor))
    source = "\n".join(p.read_text() for p in (root / "wsi_her2").rglob("*.py"))
    if minor < 11:  # standard-library names that arrived in 3.11
        for name in ("hashlib.file_digest", "tomllib", "ExceptionGroup", "asyncio.TaskGroup", "typing.Self"):
            assert name not in source, f"{name} needs Python 3.11 but pyproject allows 3.{minor}"


def test_slides_csv_keeps_every_row_under_concurrent_writers(tmp_path):
    """Cohort workers upsert slides.csv at the same time: no row may be lost (read-modify-write is locked)."""
    import csv
    from concurrent.futures import ThreadPoolExecutor

    from wsi_her2.outputs.tables import upsert_slides_csv
    from wsi_her2.result import SLIDES_CSV_COLUMNS

    path = tmp_path / "slides.csv"

    def write(i: int) -> None:
        upsert_slides_csv(path, [{c: "" for c in SLIDES_CSV_COLUMNS} | {"slide": f"s{i:03d}", "her2_score": "1+"}])

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(write, range(40)))
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(r["slide"] for r in rows) == [f"s{i:03d}" for i in range(40)]
    assert not (tmp_path / "slides.csv.lock").exists()
