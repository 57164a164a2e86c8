"""One conversion of numpy values and paths to JSON (records, their digests, GeoJSON metadata)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from wsi_her2.digests import canonical_json
from wsi_her2.jsonable import plain_value, to_jsonable


def test_numpy_values_paths_and_nesting_become_plain_json():
    value = {1: (np.float32(0.5), np.int64(3), np.bool_(True)), "a": np.arange(3), "p": Path("x/y.json"),
             "nested": [{"k": np.float64(1.25)}]}
    plain = to_jsonable(value)
    assert plain == {"1": [0.5, 3, True], "a": [0, 1, 2], "p": "x/y.json", "nested": [{"k": 1.25}]}
    assert type(plain["1"][1]) is int and type(plain["1"][2]) is bool
    assert json.loads(json.dumps(plain)) == plain


def test_the_digest_and_the_record_read_numpy_values_alike():
    record = {"x": np.float32(0.1), "n": np.int32(2), "arr": np.array([1.5, 2.0])}
    assert canonical_json(record) == canonical_json(to_jsonable(record))
    with pytest.raises(TypeError, match="not JSON serialisable: object"):
        plain_value(object())
