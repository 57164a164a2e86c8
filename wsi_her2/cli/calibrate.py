"""``wsi-her2 calibrate``: fit the default scorer's intensity and percentage cut-points to slides of known score."""
from __future__ import annotations

import argparse

from wsi_her2.cli.exits import ExitCode


def register(sub: argparse._SubParsersAction) -> None:
    from wsi_her2.score.calibrate import DAB_GAINS  # numpy only: --help stays instant

    p = sub.add_parser("calibrate", help="fit the ihc_dab cut-points to a lab's slides of known HER2 score",
                       description="Score tiled stores over a grid of DAB gains and percentage cuts, fit them to the "
                                   "labels, print leave-one-out agreement and kappa before and after, write CAL.json "
                                   "for `wsi-her2 score --calibration CAL.json`.")
    p.add_argument("stores", nargs="+", help="<slide-id>.zarr stores (from wsi-her2 tile) of slides with known scores")
    p.add_argument("--labels", required=True, help="CSV: slide (file name or id), her2_score (0, 1+, 2+, 3+)")
    p.add_argument("-o", "--out", required=True, help="calibration file to write (JSON)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--gains", default=None, metavar="G1,G2,...",
                   help=f"DAB-gain grid, must include 1 (default: {len(DAB_GAINS)} values from {min(DAB_GAINS):g} to "
                        f"{max(DAB_GAINS):g}, geometric; one scoring pass each)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from wsi_her2.errors import ConfigError
    from wsi_her2.score.calibrate import DAB_GAINS, calibrate

    try:
        gains = [float(g) for g in args.gains.split(",")] if args.gains else list(DAB_GAINS)
    except ValueError:
        raise ConfigError(f"--gains {args.gains!r}: give numbers separated by commas, e.g. 0.7,1,1.4") from None
    rep = calibrate(args.stores, args.labels, args.out, device=args.device, gains=gains)
    print(f"fitted on {rep['n_slides']} slides: dab_gain {rep['dab_gain']}, cell_fraction_cut {rep['cell_fraction_cut']}")
    if rep["gain_at_grid_edge"]:
        print(f"warning: dab_gain {rep['dab_gain']} lies on the edge of the grid ({min(gains):g}-{max(gains):g}); the lab's "
              "true gain may lie beyond it: check stain and scanner, or widen --gains")
    for name in ("before", "leave_one_out"):
        s = rep[name]
        label = "defaults (gain 1, 10 %)" if name == "before" else "leave-one-out fitted"
        print(f"{label:26s} exact {s['exact']}/{s['n']} (called {s['n_called']}), quadratic-weighted kappa {s['qwk']:.3f}")
    print(f"wrote {args.out}")
    return ExitCode.OK
