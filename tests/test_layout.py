"""Layout rules of the package that a reader relies on (checked on the source, no imports)."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "wsi_her2"
MAX_FUNCTION_LINES = 80
#: A function may run longer when a comment on its ``def`` line says why.
REASON_MARK = "# long:"


def _long_functions() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n_lines = node.end_lineno - node.lineno + 1
                if n_lines > MAX_FUNCTION_LINES and REASON_MARK not in lines[node.lineno - 1]:
                    found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({n_lines} lines)")
    return found


def test_no_function_runs_over_80_lines_without_a_stated_reason():
    assert _long_functions() == []
