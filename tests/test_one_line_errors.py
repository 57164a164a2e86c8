"""Bad output and calibration paths are one line and a non-zero exit, before any work (and, for
`run`, before any cluster starts), never a traceback."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
from conftest import one_line_error

from wsi_her2.cli import main

NOBODY = 65534


@pytest.fixture
def slides(tmp_path) -> Path:
    """A folder with one slide file: never opened, every error here comes first."""
    folder = tmp_path / "slides"
    folder.mkdir()
    (folder / "a.svs").write_bytes(b"not read")
    return folder


@pytest.fixture
def no_cluster(monkeypatch):
    pytest.importorskip("distributed")
    from wsi_her2.batch import cluster

    def refuse(*args, **kwargs):
        raise AssertionError("a cluster was started")

    for name in ("local_cluster", "existing_cluster", "slurm_cluster"):
        monkeypatch.setattr(cluster, name, refuse)


def test_run_with_out_at_an_existing_file(slides, tmp_path, capsys, no_cluster):
    afile = tmp_path / "results.txt"
    afile.write_text("mine")
    assert main(["run", str(slides), "-o", str(afile), "-q"]) == 2
    line = one_line_error(capsys, exactly_one=True)
    assert str(afile) in line and "is a file" in line and "choose another -o" in line
    assert afile.read_text() == "mine"


def test_run_with_a_calibration_folder_fails_before_the_cluster(slides, tmp_path, capsys, no_cluster):
    assert main(["run", str(slides), "-o", str(tmp_path / "out"), "--calibration", str(tmp_path), "-q"]) == 2
    assert "is a folder, not a calibration file" in one_line_error(capsys, exactly_one=True)


def test_score_with_roi_and_tma_fails_before_any_store_is_read(tmp_path, capsys):
    regions = tmp_path / "regions.geojson"
    regions.write_text('{"type": "FeatureCollection", "features": []}')
    out = tmp_path / "out"
    assert main(["score", str(tmp_path / "never-read.zarr"), "-o", str(out), "--roi", str(regions), "--tma", "-q"]) == 2
    assert "give --roi or --tma, not both" in one_line_error(capsys, exactly_one=True)
    assert not out.exists()


def test_run_with_out_in_a_read_only_folder_as_a_non_root_user():
    """As a user who may not write there (root may write anywhere: the command runs as 'nobody')."""
    pytest.importorskip("distributed")
    if os.geteuid() != 0 and not hasattr(os, "setuid"):
        pytest.skip("no way to run as another user")
    base = Path(tempfile.mkdtemp(prefix="wsi-her2-ro-"))  # /tmp/pytest-of-root is closed to other users
    try:
        os.chmod(base, 0o755)
        (base / "slides").mkdir(mode=0o755)
        (base / "slides" / "a.svs").write_bytes(b"not read")
        ro = base / "ro"
        ro.mkdir(mode=0o555)
        if os.geteuid() != 0:
            os.chmod(ro, 0o555)
        for out in (ro, ro / "cohort"):
            proc = _run_as_nobody(["run", str(base / "slides"), "-o", str(out), "-q"])
            err = proc.stderr.strip().splitlines()
            assert proc.returncode == 2, proc.stderr
            assert len(err) == 1 and "Traceback" not in err[0] and str(out) in err[0], err
            assert "not writable" in err[0] or "permission denied" in err[0]
        assert list(ro.iterdir()) == []
    finally:
        os.chmod(base / "ro", 0o755)
        shutil.rmtree(base)


def _run_as_nobody(argv: list[str]) -> subprocess.CompletedProcess:
    """``wsi-her2 ARGV`` in a child process that drops to user 'nobody' when started as root. Its modules
    are imported first: the interpreter may live where that user cannot read (/root/.pyenv)."""
    script = textwrap.dedent(f"""
        import datetime, os, sys
        import distributed, tqdm
        import wsi_her2.cli, wsi_her2.cli.run, wsi_her2.batch.runner, wsi_her2.batch.report, wsi_her2.score.pipeline
        from wsi_her2.batch import cluster
        cluster.local_cluster = lambda *a, **k: sys.exit("a cluster was started")
        if os.geteuid() == 0:
            os.setgid({NOBODY})
            os.setuid({NOBODY})
        sys.exit(wsi_her2.cli.main({argv!r}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd="/")
    if "PermissionError" in proc.stderr and "setuid" in proc.stderr:
        pytest.skip("cannot switch to user nobody here")
    return proc


def test_calibrate_with_out_at_a_folder_fails_before_scoring(tmp_path, capsys, monkeypatch):
    from wsi_her2.score import calibrate

    monkeypatch.setattr(calibrate, "measure_store", lambda *a, **k: pytest.fail("scored before checking -o"))
    labels = tmp_path / "labels.csv"
    labels.write_text("slide,her2_score\na,0\nb,1+\nc,2+\nd,3+\n")
    folder = tmp_path / "cal"
    folder.mkdir()
    stores = [str(tmp_path / f"{s}.zarr") for s in "abcd"]
    assert main(["calibrate", *stores, "--labels", str(labels), "-o", str(folder)]) == 2
    line = one_line_error(capsys, exactly_one=True)
    assert str(folder) in line and "is a folder, not a file" in line


def test_score_with_a_calibration_folder(tmp_path, capsys):
    assert main(["score", str(tmp_path / "s.zarr"), "--calibration", str(tmp_path)]) == 2
    line = one_line_error(capsys, exactly_one=True)
    assert str(tmp_path) in line and "is a folder, not a calibration file" in line


# --- one error path for every command -------------------------------------------------------------
def test_every_command_reports_errors_through_one_function():
    """No command prints an ``error:`` line of its own: cli/exits.py formats them all (report_error, EachItem)."""
    import ast

    package = Path(__file__).resolve().parents[1] / "wsi_her2"
    own = []
    for path in sorted(package.rglob("*.py")):
        if path.name == "exits.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            text = node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else ""
            if ": error:" in text:
                own.append(f"{path.relative_to(package.parent)}:{node.lineno}")
    assert own == []


def test_an_os_error_of_a_single_item_command_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    """Regression: an OSError (a full disk, no permission) escaped main as a traceback unless the command looped items."""
    import errno

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "review.html"))

    monkeypatch.setattr("wsi_her2.outputs.review.collect_rows", disk_full)
    assert main(["review", str(tmp_path)]) == 2
    line = one_line_error(capsys)
    assert line.startswith("wsi-her2 review: error: ") and "No space left on device" in line


def test_the_exit_codes_are_the_readme_s():
    import re

    from wsi_her2.cli.exits import ExitCode

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    table = readme[readme.index("| exit code |"):].split("\n\n")[0]
    documented = {int(code) for code in re.findall(r"^\| `(\d+)` \|", table, flags=re.M)}
    assert documented == {int(code) for code in ExitCode}
