"""Shared by the runner scripts: every runner prints one JSON line with the same keys.

The runners execute inside a tool's own virtual environment, so this module uses only the
standard library.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time


def self_and_children_maxrss_mb() -> float:
    """Peak RSS of this process plus the largest of its finished children (MB).

    ``ru_maxrss`` is in KiB on Linux. For children it is the peak of the single largest child,
    not the sum of concurrent ones, so the benchmark also polls the whole process tree.
    """
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return (own + kids) / 1024.0


def emit(*, tool: str, version: str, tiles: int, seconds: float, processes: int, **extra: object) -> None:
    """Print the result line the benchmark parses (the last line starting with ``{``)."""
    result = {
        "tool": tool,
        "version": version,
        "tiles": int(tiles),
        "seconds": round(float(seconds), 4),
        "tiles_per_s": round(tiles / seconds, 2) if seconds > 0 else None,
        "processes": int(processes),
        "maxrss_self_children_mb": round(self_and_children_maxrss_mb(), 1),
    }
    result.update(extra)
    sys.stdout.flush()
    print(json.dumps(result), flush=True)


def runner_parser(description: str, *, mpp: bool = True) -> argparse.ArgumentParser:
    """The arguments every runner takes: SLIDE OUT_DIR [--workers N] [--mpp UM] [--tile-px PX]."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("slide")
    parser.add_argument("out_dir")
    parser.add_argument("--workers", type=int, default=1)
    if mpp:
        parser.add_argument("--mpp", type=float, default=0.5)
    parser.add_argument("--tile-px", type=int, default=224)
    return parser


class Stopwatch:
    """Named wall-clock laps: ``with sw.lap("read"): ...``; ``sw.laps`` maps name -> seconds."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> "_Lap":
        return _Lap(self, name)


class _Lap:
    def __init__(self, sw: Stopwatch, name: str) -> None:
        self.sw, self.name = sw, name

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.sw.laps[self.name] = round(self.sw.laps.get(self.name, 0.0) + time.perf_counter() - self.t0, 4)
