"""Writing a slide's outputs: side by side, and without importing pandas."""
from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from wsi_her2.outputs.slide_outputs import run_side_by_side


def test_writers_run_at_once_and_results_keep_their_order():
    started = threading.Barrier(3, timeout=5)  # each writer waits for the other two: fails unless they overlap

    def writer(value):
        def run():
            started.wait()
            return value
        return run

    assert list(run_side_by_side({"b": writer(2), "a": writer(1), "c": writer(3)}).items()) == [("b", 2), ("a", 1), ("c", 3)]


def test_a_failing_writer_raises_after_the_others_have_finished():
    finished = []

    def slow():
        time.sleep(0.2)
        finished.append("slow")
        return "ok"

    def broken():
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        run_side_by_side({"broken": broken, "slow": slow})
    assert finished == ["slow"]  # not abandoned half-way


def test_tiles_parquet_is_written_without_importing_pandas(tmp_path):
    """pa.array imports pandas (~0.3-0.4 s); the table is built from buffers instead, same schema and values."""
    code = f"""
import sys
import numpy as np
import pyarrow.parquet as pq
from wsi_her2.outputs.tables import _arrow_array
import pyarrow as pa
cols = {{"n": np.arange(3, dtype=np.int64), "ok": np.array([True, False, True]), "x": np.array([0.5, np.nan, 2.0], np.float32),
        "why": ["low_tissue", None, "blur"]}}
t = pa.Table.from_arrays([_arrow_array(v) for v in cols.values()], names=list(cols))
pq.write_table(t, {str(tmp_path / "t.parquet")!r})
assert "pandas" not in sys.modules, "pandas was imported"
back = pq.read_table({str(tmp_path / "t.parquet")!r})
assert back.schema == pa.schema([("n", pa.int64()), ("ok", pa.bool_()), ("x", pa.float32()), ("why", pa.string())])
assert back["n"].to_pylist() == [0, 1, 2] and back["ok"].to_pylist() == [True, False, True]
x = back["x"].to_pylist()
assert x[0] == 0.5 and x[1] != x[1] and x[2] == 2.0 and back["x"].null_count == 0  # NaN stays NaN, not null
assert back["why"].to_pylist() == ["low_tissue", None, "blur"] and back["why"].null_count == 1
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
