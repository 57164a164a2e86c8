"""How many CPUs this process may use: one definition for every stage's default parallelism."""
from __future__ import annotations

import os

__all__ = ["available_cpus"]


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask (``taskset``, a batch scheduler's CPU set),
    not the machine's count; ``os.cpu_count()`` where there is no affinity (macOS)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no affinity on this platform
        return os.cpu_count() or 1
