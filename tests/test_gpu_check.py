"""benchmarks/gpu_check.sh and its driver parse, plan the right steps and render their table."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


def _driver():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_shell_script_parses_and_its_dry_run_names_the_cpu_fallback(tmp_path):
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    venv = tmp_path / "venv" / "bin"
    venv.mkdir(parents=True)
    wrapper = venv / "python"  # the script runs "$VENV/bin/python": this interpreter, with its packages
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    env = dict(os.environ, GPU_CHECK_INSTALL="0", GPU_CHECK_VENV=str(tmp_path / "venv"), WSI_HER2_BENCH_DIR=str(tmp_path))
    out = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--cpu"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("no GPU: CPU fallback")
    assert "bench_score.py --device cpu" in out.stdout and "--end-to-end --device cpu" in out.stdout


def test_gpu_plan_runs_every_model_eager_and_compiled_and_the_40k_slide(tmp_path):
    steps = dict(_driver().plan(cuda=True, out=tmp_path, data_dir=tmp_path))
    assert steps["gpu tests"][-3:] == ["-m", "gpu", "tests"]
    assert "--compile" not in steps["bench_score eager"] and "--compile" in steps["bench_score compile"]
    for cmd in (steps["bench_score eager"], steps["bench_score compile"]):
        assert cmd[cmd.index("--models") + 1] == "ihc_dab,resnet50,convnext_tiny" and cmd[cmd.index("--device") + 1] == "cuda"
    e2e = steps["end to end"]
    assert e2e[e2e.index("--width") + 1] == "40000" and e2e[e2e.index("--height") + 1] == "30000"


def test_table_reports_full_over_bare_end_to_end_and_failures(tmp_path):
    row = {"model": "resnet50", "precision": "bf16", "batch": 256, "ceiling_img_s": 15000.0, "full_path_tiles_s": 14000.0,
           "ratio": 14000 / 15000, "peak_gpu_mem_gb": 3.2}
    (tmp_path / "score-eager.json").write_text(json.dumps({"rows": [row]}))
    (tmp_path / "end_to_end.json").write_text(json.dumps({
        "slide": "s.svs", "tiles": 15000, "cores": 16, "tile_tiles_s": 12000.0, "score_tiles_s": 20000.0,
        "end_to_end_tiles_s": 7500.0, "peak_gpu_mem_gb": 1.5}))
    table = _driver().render(tmp_path, device_name="H200", steps_rc={"gpu tests": 0, "bench_score compile": 1}, seconds=300)
    assert "| resnet50 | eager, bf16, batch 256 | 15,000 | 14,000 | 0.93 | 3.2 |" in table
    assert "end to end 7,500 tiles/s" in table
    assert "FAILED: bench_score compile" in table
