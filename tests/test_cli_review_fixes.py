"""Review findings on the command line: what an error line names, help text built from the code, exit codes from
their one table, and the README's option tables and columns held to the parser and the writers."""
from __future__ import annotations

import ast
import json
import re
from pathlib import Path

from conftest import one_line_error

from wsi_her2.cli import build_parser, main
from wsi_her2.cli.exits import ExitCode

REPO = Path(__file__).resolve().parents[1]
#: Commands whose ``run`` still returns literal numbers, owned elsewhere. Nothing may join this list.
LITERAL_EXITS_LEFT = {"app", "demo", "evaluate", "explain", "review", "train"}


def _subparser(command: str):
    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    return sub.choices[command]


def test_verify_os_error_names_the_path_not_the_check(tmp_path, capsys):
    """Regression: the items were (path, function) tuples, so an OSError printed their repr."""
    from wsi_her2.outputs.manifest import OUTPUT_FILES_KEY, RESULT_DIGEST_KEY

    folder = tmp_path / "d"
    (folder / "x.geojson").mkdir(parents=True)  # an output that is a folder: hashing it is an OSError
    size = (folder / "x.geojson").stat().st_size
    record = {"slide": "x", "call": {}, "row": {}, RESULT_DIGEST_KEY: "0",
              OUTPUT_FILES_KEY: {"x.geojson": {"bytes": size, "sha256": "0"}}}
    (folder / "x.json").write_text(json.dumps(record))
    assert main(["verify", str(folder)]) == ExitCode.PROBLEMS
    line = one_line_error(capsys)
    assert line.startswith(f"wsi-her2 verify: error: {folder / 'x.json'}: "), line
    assert "PosixPath" not in line and "function" not in line


def test_calibrate_help_states_the_grid_it_uses():
    from wsi_her2.score.calibrate import DAB_GAINS

    text = " ".join(_subparser("calibrate").format_help().split())
    assert f"{len(DAB_GAINS)} values from {min(DAB_GAINS):g} to {max(DAB_GAINS):g}" in text, text


def test_cohort_exit_codes_come_from_the_table(tmp_path):
    from wsi_her2.batch.runner import CohortResult

    def result(failed: dict, pending: list) -> CohortResult:
        return CohortResult(tmp_path, 2, [], failed, pending, 0, 0, 0.0, tmp_path / "slides.csv")

    codes = [result({"a": "why"}, []).exit_code, result({}, ["a"]).exit_code, result({}, []).exit_code]
    assert codes == [ExitCode.PROBLEMS, ExitCode.UNFINISHED, ExitCode.OK]
    assert all(type(c) is ExitCode for c in codes)


def test_commands_return_exit_codes_not_numbers():
    """A literal ``return 0`` hides which row of the exit-code table a command means."""
    literal = []
    for path in sorted((REPO / "wsi_her2" / "cli").glob("*.py")):
        if path.stem in LITERAL_EXITS_LEFT:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef) and node.name == "run":
                literal += [f"{path.name}:{r.lineno}" for r in ast.walk(node) if isinstance(r, ast.Return)
                            and isinstance(r.value, ast.Constant) and isinstance(r.value.value, int)]
    assert literal == []


def _readme_section(title: str) -> str:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    return readme[readme.index(title):]


def test_readme_option_tables_hold_every_option_of_tile_and_score():
    for command in ("tile", "score"):
        section = _readme_section(f"### `wsi-her2 {command}`")
        table = section[section.index("| option |"):].split("\n\n")[0]
        documented = {o for line in table.splitlines()[2:]
                      for o in re.findall(r"(?<![\w-])(--?[a-z][a-z0-9-]*)", line.split("|")[1])}
        options = {o for a in _subparser(command)._actions for o in a.option_strings} - {"-h", "--help", "-q", "--quiet"}
        assert (sorted(options - documented), sorted(documented - options)) == ([], []), command


def test_readme_lists_the_slides_csv_columns_score_writes():
    from wsi_her2.result import SLIDES_CSV_COLUMNS

    section = _readme_section("### `wsi-her2 score`")
    listed = section[section.index("(columns `"):].split("`")[1]
    assert [c.strip() for c in listed.split(",")] == list(SLIDES_CSV_COLUMNS)
