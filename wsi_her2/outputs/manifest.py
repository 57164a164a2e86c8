"""What a scored slide wrote, and whether it is still what was written.

``<id>.json`` records, in ``output_files``, the SHA-256 and size of every per-slide file the score
wrote (tiles parquet, GeoJSON, pictures), and covers itself with an embedded digest:
``result_sha256`` is the SHA-256 of the canonical JSON of every other key
(:func:`wsi_her2.digests.record_sha256`). Embedded rather than a sidecar file, so the record and
its digest are written in one atomic rename and a kill can never leave one without the other.
Shared tables (``slides.csv``, ``regions.csv``, ``cores.csv``) change as other slides are
scored, so they carry no file digest; the slide's rows in them are checked against the rows its
``<id>.json`` records.

The record holds only finite numbers: a NaN or infinity anywhere becomes ``null`` (JSON has no
``Infinity``; Python would write one and other readers would refuse the file).

:func:`check_result` lists what is wrong (empty: all is as written); ``score`` uses it to rebuild
a slide whose outputs are missing or damaged, and ``wsi-her2 verify`` (:func:`verify_result`) to
report damage in one line.
"""
from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsi_her2.csv_cells import safe_cell, written_row
from wsi_her2.digests import record_sha256, sha256_file
from wsi_her2.errors import OutputError
from wsi_her2.files import atomic_write_text
from wsi_her2.jsonable import to_jsonable

RESULT_DIGEST_KEY = "result_sha256"
OUTPUT_FILES_KEY = "output_files"
#: Tables shared by the slides of a folder: checked row by row, never by file digest.
SHARED_TABLES = ("slides.csv", "regions.csv", "cores.csv")


class DamagedOutputError(OutputError):
    """A scored slide's outputs differ from what its ``<id>.json`` recorded (missing, changed, unreadable)."""


@dataclass(frozen=True)
class OutputsReport:
    result: Path
    n_files: int
    n_bytes: int
    n_table_rows: int


def finite(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by ``None`` (recursively)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value


def write_result_json(path: Path, result: dict) -> dict:
    """Write ``<id>.json``: ``result`` (numpy values and paths as plain JSON, finite numbers only), the
    digests of its per-slide outputs and its own digest, atomically. Returns the record."""
    path = Path(path)
    record = finite(to_jsonable(result))
    record.pop(RESULT_DIGEST_KEY, None)
    record[OUTPUT_FILES_KEY] = {rel: _file_entry(path.parent / rel) for rel in _per_slide_files(record, path.parent)}
    record[RESULT_DIGEST_KEY] = record_sha256(record)
    atomic_write_text(path, json.dumps(record, indent=2, allow_nan=False))
    return record


def _per_slide_files(record: dict, folder: Path) -> list[str]:
    """The files named in ``record["outputs"]``, relative to ``folder``, shared tables left out."""
    rel = {os.path.relpath(p, folder) for p in (record.get("outputs") or {}).values() if isinstance(p, str)}
    return sorted(r for r in rel if Path(r).name not in SHARED_TABLES)


def _file_entry(path: Path) -> dict:
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def read_result(path: Path) -> tuple[dict | None, str | None]:
    """``(record, None)``, or ``(None, why it cannot be read)``."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return None, f"{Path(path).name} unreadable ({type(exc).__name__})"
    if not isinstance(record, dict):
        return None, f"{Path(path).name} is not a result record"
    return record, None


def check_result(path: Path, record: dict, *, tables: tuple[str, ...] = SHARED_TABLES) -> list[str]:
    """What differs from what ``record`` (read from ``path``) says was written; empty when nothing does.

    A record written before outputs carried digests (no ``result_sha256``) is checked for the
    presence of its files only. ``tables``: the shared tables whose rows of the slide are checked."""
    path = Path(path)
    problems = []
    files = record.get(OUTPUT_FILES_KEY)
    if RESULT_DIGEST_KEY not in record:
        files = {rel: None for rel in _per_slide_files(record, path.parent)}
    elif record[RESULT_DIGEST_KEY] != record_sha256({k: v for k, v in record.items() if k != RESULT_DIGEST_KEY}):
        problems.append(f"{path.name} does not match its SHA-256 (edited or corrupted)")
    for rel, entry in sorted((files or {}).items()):
        problem = _file_problem(path.parent / rel, entry)
        if problem:
            problems.append(f"{rel} {problem}")
    return problems + _table_problems(path.parent, record, tables)


def _file_problem(path: Path, entry: dict | None) -> str | None:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "is missing"
    if entry is None:
        return None
    if size != entry.get("bytes") or sha256_file(path) != entry.get("sha256"):
        return "differs from the SHA-256 recorded (truncated, overwritten or edited)"
    return None


def _table_problems(folder: Path, record: dict, names: tuple[str, ...]) -> list[str]:
    """The slide's rows in the shared tables ``names`` against the rows ``record`` holds."""
    sid = str(record.get("slide", ""))
    expected = {"slides.csv": [record["row"]] if isinstance(record.get("row"), dict) else []}
    for kind in ("region", "core"):
        expected[f"{kind}s.csv"] = [dict(r, slide=sid) for r in record.get(f"{kind}s") or []]
    problems = []
    for name in names:
        if not expected.get(name):
            continue
        if not (folder / name).is_file():  # a deleted table: its rows are gone with it
            problems.append(f"{name} is missing (it held the rows of {sid})")
            continue
        try:
            columns, have = _rows_of(folder / name, sid)
        except (UnicodeDecodeError, csv.Error) as exc:  # not UTF-8, or not CSV: damage to report, not a traceback
            problems.append(f"{name} unreadable ({type(exc).__name__})")
            continue
        if sorted(have) != sorted(written_row(r, columns) for r in expected[name]):
            problems.append(f"the rows of {sid} in {name} " + ("are missing" if not have else "differ from its record"))
    return problems


def _rows_of(path: Path, slide_id: str) -> tuple[list[str], list[tuple[str, ...]]]:
    """The table's columns and the slide's rows in it."""
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        rows = [r for r in reader if r.get("slide") == safe_cell(slide_id)]
        columns = list(reader.fieldnames or [])
    return columns, [tuple(r.get(c) or "" for c in columns) for r in rows]


# --- wsi-her2 verify --------------------------------------------------------------------------------
def is_result_record(path: Path) -> bool:
    """Whether ``path`` looks like a scored slide's ``<id>.json`` (or the damaged remains of one)."""
    path = Path(path)
    if path.name.endswith(".no_tissue.json") or path.suffix != ".json":
        return False
    record, _ = read_result(path)
    if record is None:  # unreadable: ours if a store or a no-tissue record of that name lies beside it
        stem = path.name.removesuffix(".json")
        return (path.parent / f"{stem}.zarr").is_dir() or (path.parent / f"{stem}.no_tissue.json").is_file()
    return {"slide", "call", "row"} <= set(record)


def verify_result(path: str | Path) -> OutputsReport:
    """Check a scored slide's outputs against its ``<id>.json``; one-line :class:`DamagedOutputError` if damaged."""
    path = Path(path)
    record, why = read_result(path)
    problems = [why] if record is None else check_result(path, record)
    if problems:
        more = f"; and {len(problems) - 1} more" if len(problems) > 1 else ""
        raise DamagedOutputError(f"{path}: damaged outputs ({problems[0]}{more}); rebuild them with "
                                 f"`{rescore_command(path, record)}` (it re-scores the slide)")
    files = record.get(OUTPUT_FILES_KEY) or {}
    n_rows = 1 + sum(len(record.get(k) or []) for k in ("regions", "cores"))
    return OutputsReport(path, len(files), sum(int(e.get("bytes", 0)) for e in files.values()), n_rows)


def rescore_command(path: Path, record: dict | None) -> str:
    """The command that scores the slide of ``path`` again: its store beside it, else where it was scored from."""
    beside = path.parent / f"{path.name.removesuffix('.json')}.zarr"
    store = beside if beside.exists() or not (record or {}).get("store") else record["store"]
    return f"wsi-her2 score {store} -o {path.parent}"
