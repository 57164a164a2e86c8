"""``wsi-her2 evaluate``: metrics, JSON report and plots of a trained model on labelled tiles."""
from __future__ import annotations

import argparse
import csv
import json
import logging
import time
from pathlib import Path

from wsi_her2.csv_cells import safe_row
from wsi_her2.errors import DatasetError

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="evaluate a trained model on labelled tiles",
        description=(
            "Accuracy, per-class and macro precision/recall/F1, one-vs-rest ROC-AUC, confusion matrix and "
            "quadratic-weighted kappa; writes eval_report.json and PNG plots."
        ),
    )
    p.add_argument("model", help="model.safetensors written by `wsi-her2 train` (or a registry name with --weights)")
    p.add_argument("data", help="class folders, a CSV, BCI-named tiles, or a run's split.csv (with --split test)")
    p.add_argument("--weights", default=None, help="weights file when MODEL is a registry name")
    p.add_argument("-o", "--out", default=None, help="output folder (default: beside the model, eval_<data name>)")
    p.add_argument("--split", default=None, help="only rows of this split (a CSV with a 'split' column)")
    p.add_argument("--tta", nargs="?", const="d4", default=None, choices=("flips", "rot90", "d4"),
                   help="test-time augmentation (default set: d4, the 8 flips/rotations)")
    p.add_argument("--path-col", default="path")
    p.add_argument("--label-col", default="label")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from wsi_her2.models import load_model
    from wsi_her2.train.data import TileDataset, discover_dataset
    from wsi_her2.train.evaluate import classification_report, format_table, predict_dataset, write_report
    from wsi_her2.stain.normalize import normalizer_from_config
    from wsi_her2.devices import resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    model = load_model(args.model, weights=args.weights, map_location=device)
    cfg = model.wsi_her2_config
    ds = discover_dataset(args.data, classes=cfg.classes, path_col=args.path_col, label_col=args.label_col)
    records = [r for r in ds.records if args.split is None or r.split == args.split]
    if not records:
        raise DatasetError(f"no tiles in {args.data}" + (f" with split {args.split!r}" if args.split else ""))
    tiles = TileDataset.from_records(records, cfg.classes, input_px=cfg.input_px, mean=cfg.mean, std=cfg.std,
                                     stain_norm=normalizer_from_config(cfg.stain_norm))
    t0 = time.perf_counter()
    y, p = predict_dataset(model, tiles, batch_size=args.batch_size, device=str(device), tta=args.tta or False)
    dt = time.perf_counter() - t0
    report = classification_report(y, p, cfg.classes)
    report.update({"model": str(args.model), "data": str(args.data), "split": args.split, "tta": args.tta,
                   "seconds": dt, "images_per_s": len(y) / dt if dt > 0 else None})
    out = Path(args.out) if args.out else Path(args.model).parent / f"eval_{Path(args.data).stem}"
    paths = write_report(report, out, y_true=y, probs=p, prefix="eval")
    with (out / "predictions.csv").open("w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["path", "label", *(f"p_{c}" for c in cfg.classes)])
        for r, row in zip(records, p):
            w.writerow(safe_row([str(r.path), r.label, *(f"{v:.6f}" for v in row)]))
    print(format_table(report))
    print(f"{len(y)} tiles, {report['images_per_s']:.1f} images/s{' with TTA ' + args.tta if args.tta else ''}")
    print(f"report: {paths['json']}")
    json.dumps(report)  # fail here, not in a consumer, if something is not serialisable
    return 0
