"""Kernel time to write chunk files: one write() per chunk vs 1 MiB pieces (why the store writes in pieces).

Writes ``--chunks`` files of one raw 64-tile chunk each (64 x 224 x 224 x 3 = 9.6 MB, new
content per file, as the tiler does) into a fresh folder, alternating the two ways twice, and
reports the system CPU seconds spent in ``write()`` per GB and the ratio. The folder is emptied
and ``sync``-ed before each pass so one pass's write-back does not land in the next.

    python benchmarks/bench_write.py [--dir bench-out/write] [--chunks 200]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import numpy as np

PIECE_BYTES = 1 << 20  # wsi_her2.store.patch_store.WRITE_PIECE_BYTES


def write_pass(folder: Path, chunks: int, *, piece: int | None) -> float:
    """System CPU seconds inside the writes of one pass."""
    shutil.rmtree(folder, ignore_errors=True)
    os.sync()
    folder.mkdir(parents=True)
    base = np.random.default_rng(0).integers(0, 255, (64, 224, 224, 3), dtype=np.uint8)
    sys_s = 0.0
    for k in range(chunks):
        view = memoryview((base + k).tobytes())  # new content, like each unit's tiles
        t0 = os.times().system
        with open(folder / f"c{k}", "wb", buffering=0) as fh:
            if piece is None:
                fh.write(view)
            else:
                for i in range(0, len(view), piece):
                    fh.write(view[i : i + piece])
        sys_s += os.times().system - t0
    shutil.rmtree(folder, ignore_errors=True)
    return sys_s


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", type=Path, default=Path(os.environ.get("WSI_HER2_BENCH_DIR", "bench-out")) / "write")
    parser.add_argument("--chunks", type=int, default=200)
    args = parser.parse_args(argv)
    gb = args.chunks * 64 * 224 * 224 * 3 / 1e9
    results: dict[str, list[float]] = {"one write() per chunk": [], "1 MiB pieces": []}
    for _ in range(2):
        results["one write() per chunk"].append(write_pass(args.dir, args.chunks, piece=None))
        results["1 MiB pieces"].append(write_pass(args.dir, args.chunks, piece=PIECE_BYTES))
    print(f"{args.chunks} chunk files, {gb:.2f} GB, folder {args.dir}")
    for name, values in results.items():
        print(f"  {name:<24s} system CPU s per GB: " + ", ".join(f"{v / gb:.2f}" for v in values))
    whole, pieces = min(results["one write() per chunk"]), min(results["1 MiB pieces"])
    print(f"ratio (best of each): one write() costs {whole / max(pieces, 1e-9):.1f}x the kernel time of 1 MiB pieces")
    return 0


if __name__ == "__main__":
    sys.exit(main())
