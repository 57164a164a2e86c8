"""``wsi-her2 verify``: check patch stores chunk by chunk (presence and CRC32C, attribute digest) and
scored slides' outputs against the SHA-256 their ``<id>.json`` recorded, decoding nothing."""
from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="check that patch stores and scored outputs are complete and undamaged",
                       description="Check every array, chunk file and chunk checksum of each store and its attributes' "
                                   "digest, and every output file of each scored slide against the SHA-256 its <id>.json "
                                   "recorded (with its rows in slides.csv, regions.csv, cores.csv); a damaged store or "
                                   "output is one line with the command that rebuilds it.")
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="<slide-id>.zarr stores, <slide-id>.json results, or folders holding them (a cohort's "
                        "output folder: its per-slide folder too)")
    p.set_defaults(func=run)


def targets(path: Path) -> tuple[list[Path], list[Path]]:
    """The stores and result records that ``path`` names (a store, a result, or a folder of them)."""
    from wsi_her2.batch.runner import PER_SLIDE_DIRNAME
    from wsi_her2.outputs.manifest import is_result_record

    if path.name.endswith(".zarr") or not path.is_dir():
        if path.suffix == ".json":
            return [], [path]
        result = path.with_name(path.name.removesuffix(".zarr") + ".json")
        return [path], [result] if result.is_file() else []
    folders = [path] + [p for p in (path / PER_SLIDE_DIRNAME,) if p.is_dir()]  # a cohort's outputs (wsi-her2 run)
    stores = [s for f in folders for s in sorted(f.glob("*.zarr")) if (s / "zarr.json").is_file()]
    results = [r for f in folders for r in sorted(f.glob("*.json")) if is_result_record(r)]
    return stores, results


def run(args: argparse.Namespace) -> int:
    from wsi_her2.cli.exits import EachItem

    checks: list[Path] = []
    for path in map(Path, args.paths):
        stores, results = targets(path)
        checks += stores + results or [path]
    # the items are plain paths, so an error of one (an OSError) is reported naming its path
    each = EachItem("verify", checks, _verify_one, noun="stores and scored slides")
    for _, rep in each:
        print(_ok_line(rep))
    return each.exit_code()


def _verify_one(path: Path):
    """Check one path :func:`targets` found: a result record, a patch store, or nothing there."""
    from wsi_her2.errors import StoreError
    from wsi_her2.outputs.manifest import verify_result
    from wsi_her2.store.verify import verify_store

    if path.suffix == ".json":
        return verify_result(path)
    if path.is_dir() and not path.name.endswith(".zarr"):  # a folder in which targets() found nothing
        raise StoreError(f"{path}: no patch store or scored slide there; give a <slide-id>.zarr, a <slide-id>.json or a folder of them")
    return verify_store(path)


def _ok_line(rep) -> str:
    if hasattr(rep, "n_chunks"):
        return (f"{rep.store}: ok, {rep.n_tiles} tiles, {rep.n_chunks} chunks present, "
                f"{rep.n_checksummed} checksums match ({rep.n_bytes / 1e6:.1f} MB read)")
    return (f"{rep.result}: ok, {rep.n_files} output files match their SHA-256 ({rep.n_bytes / 1e6:.1f} MB read), "
            f"its record's digest and its table rows ({rep.n_table_rows}) match")
