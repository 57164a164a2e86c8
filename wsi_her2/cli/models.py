"""``wsi-her2 models``: list the patch classifiers in the registry, or show a weights file's config."""
from __future__ import annotations

import argparse
import json

from wsi_her2.cli.exits import ExitCode


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "models",
        help="list the patch classifiers (architectures, tile size, resolution)",
        description=(
            "List the registered patch classifiers with the tile size and resolution (MPP) each expects. "
            "Parameter counts are computed without allocating weights."
        ),
    )
    parser.add_argument("names", nargs="*", metavar="NAME", help="only these models (default: all)")
    parser.add_argument("--json", action="store_true", help="print the full configs as JSON")
    parser.add_argument("--no-params", action="store_true", help="skip the parameter counts (faster)")
    parser.add_argument(
        "--inspect", metavar="FILE", help="print the config stored in a weights file (.safetensors/.pt) and exit"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from wsi_her2 import models  # torch and timm load here, not at `wsi-her2 --help`

    if args.inspect:
        config = models.read_config(args.inspect)
        if config is None:
            print(f"{args.inspect}: no model config stored with this file (load it with --model NAME --weights FILE)")
            return ExitCode.PROBLEMS
        print(config.to_json(indent=2))
        return ExitCode.OK

    names = args.names or models.list_models()
    configs = [models.get_config(name) for name in names]  # ModelNotFoundError names close matches
    if args.json:
        print(json.dumps([c.to_dict() for c in configs], indent=2))
        return ExitCode.OK

    header = ("name", "arch", "input px", "tile px", "mpp um", "head", "weights", "params M", "description")
    rows = []
    for c in configs:
        n_params = None if args.no_params else models.count_parameters(c)
        rows.append((
            c.name,
            c.arch,
            str(c.input_px),
            str(c.tile_px),
            f"{c.mpp_um:g}",
            c.head,
            "needed" if c.needs_weights else "none",
            "-" if not n_params else f"{n_params / 1e6:.1f}",
            c.description,
        ))
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header[:-1])]
    for row in (header, *rows):
        cells = [cell.ljust(w) if i < 2 or i in (5, 6) else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))]
        print("  ".join(cells + [row[-1]]).rstrip())
    return ExitCode.OK
