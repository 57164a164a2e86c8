"""SHA-256 digests of files and of JSON-like records (one canonical form for every check).

A record's digest is the SHA-256 of its canonical JSON: keys sorted, no whitespace, UTF-8, numpy
scalars as their Python values. It is what a store's attributes and a scored slide's ``<id>.json``
carry about themselves, so an edited or corrupted value is noticed when they are read back.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from wsi_her2.jsonable import plain_value


def sha256_file(path: str | Path, *, block_bytes: int = 1 << 20) -> str:
    """SHA-256 of a file read in 1 MiB blocks (hashlib releases the GIL on each block)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while block := fh.read(block_bytes):
            digest.update(block)
    return digest.hexdigest()


def canonical_json(record: Any) -> bytes:
    """The canonical JSON bytes of ``record`` (sorted keys, compact, UTF-8)."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=plain_value).encode("utf-8")


def record_sha256(record: Any) -> str:
    """SHA-256 of ``record``'s canonical JSON."""
    return hashlib.sha256(canonical_json(record)).hexdigest()
