"""``wsi-her2 verify``: check patch stores chunk by chunk (presence and CRC32C), decoding nothing."""
from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="check that patch stores are complete and undamaged",
                       description="Check every array, chunk file and chunk checksum of each store; "
                                   "a damaged store is one line with the command that rebuilds it.")
    p.add_argument("stores", nargs="+", help="<slide-id>.zarr patch stores")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from wsi_her2.errors import WsiHer2Error
    from wsi_her2.store.verify import verify_store

    failed = 0
    for store in args.stores:
        try:
            rep = verify_store(store)
        except WsiHer2Error as exc:
            failed += 1
            print(f"wsi-her2 verify: error: {exc}", file=sys.stderr)
            continue
        print(f"{rep.store}: ok, {rep.n_tiles} tiles, {rep.n_chunks} chunks present, "
              f"{rep.n_checksummed} checksums match ({rep.n_bytes / 1e6:.1f} MB read)")
    if failed:
        print(f"wsi-her2 verify: {failed} of {len(args.stores)} stores damaged or unreadable", file=sys.stderr)
        return 1
    return 0
