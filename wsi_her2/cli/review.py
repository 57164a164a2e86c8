"""``wsi-her2 review``: one static HTML page to review a cohort's output folder in a browser."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "review", help="write OUT/review.html: every slide's thumbnail, call, category, confidence, QC flags, report link",
        description="Write OUT/review.html, a static page (no server, no network) listing every slide of the output "
                    "folder with its heatmap thumbnail, call, category, confidence, QC flags and a link to its report; "
                    "failed and indeterminate slides first; sortable and filterable.",
    )
    p.add_argument("out", help="an output folder of `wsi-her2 score` or `wsi-her2 run`")
    p.add_argument("--labels", default=None, metavar="CSV",
                   help="reference scores (columns slide, her2_score): adds a label column and the agreement table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from wsi_her2.outputs.review import write_review
    from wsi_her2.score.calibrate import read_labels

    labels = read_labels(args.labels) if args.labels else None
    page = write_review(args.out, labels=labels)
    print(f"review page: {page}")
    return 0
