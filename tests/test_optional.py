"""Optional dependencies: a missing extra is one clear line naming it, not a traceback."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from wsi_her2.cli import main
from wsi_her2.errors import MissingDependencyError, WsiHer2Error
from wsi_her2.optional import EXTRAS, require

REPO = Path(__file__).resolve().parents[1]


def test_require_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "gradio", None)  # makes `import gradio` fail as if absent
    with pytest.raises(MissingDependencyError, match=r"pip install 'wsi-her2\[app\]'") as info:
        require("gradio", purpose="wsi-her2 app")
    assert isinstance(info.value, ImportError) and isinstance(info.value, WsiHer2Error)
    assert "wsi-her2 app needs the optional package 'gradio'" in str(info.value)


def test_require_returns_the_module_when_present():
    assert require("json", purpose="x").dumps([1]) == "[1]"


def test_run_without_dask_is_one_line_and_exit_2(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "distributed", None)
    code = main(["run", str(tmp_path), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == [("wsi-her2 run: error: wsi-her2 run needs the optional package 'dask[distributed]', which is not "
                    "installed; install it with: pip install 'wsi-her2[cohort]'")]


def test_extras_in_pyproject_match_the_table():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = meta["optional-dependencies"]
    core = " ".join(meta["dependencies"])
    for module, (dist, extra) in EXTRAS.items():
        assert any(d.startswith(dist) for d in extras[extra]), (module, extra)
        assert dist.split("[")[0] not in core, f"{dist} is optional but also a core dependency"
    assert "pytest" not in core and any(d.startswith("pytest") for d in extras["test"])
    assert set(extras) >= {"cohort", "train", "app", "test", "all"}
    assert extras["all"] == ["wsi-her2[cohort,train,app,test]"]
    ci = (REPO / ".ci" / "run").read_text()
    readme = (REPO / "README.md").read_text()
    assert '-e ".[all]"' in ci and '-e ".[all]"' in readme  # README set-up and CI install the same
    assert "chromium-driver" in ci


def test_benchmarks_hold_no_machine_paths():
    for path in (REPO / "benchmarks").rglob("*"):
        if path.is_file() and path.suffix in (".py", ".md"):
            assert "/work/" not in path.read_text(), path
