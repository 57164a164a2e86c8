"""``wsi-her2 train``: train a patch classifier from labelled tiles with a named recipe."""
from __future__ import annotations

import argparse
import logging
import sys

from wsi_her2.errors import ConfigError

log = logging.getLogger(__name__)

RECIPE_NAMES = ("all-trainable", "phased", "frozen-fusion", "selective-freeze")
STAIN_CHOICES = ("none", "reinhard", "reinhard-fixed", "macenko")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a patch classifier on labelled tiles",
        description=(
            "Train a registry model on labelled tiles (class folders, a CSV, or BCI-named files) with a "
            "recipe from the papers. Writes model.safetensors (loadable by `wsi-her2 score`), history, "
            "plots and a test report into -o."
        ),
    )
    p.add_argument("data", help="folder of class subfolders, a CSV (path,label[,group]), or BCI-named tiles")
    p.add_argument("-o", "--out", required=True, help="output folder for the run")
    p.add_argument("--model", default=None, help="registry model name (default: the recipe's)")
    p.add_argument("--recipe", default="all-trainable", choices=RECIPE_NAMES)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field, e.g. --set lr=1e-3 --set phase_epochs=2,2,2 (repeatable)")
    p.add_argument("--show-recipe", action="store_true", help="print the resolved recipe and exit")
    p.add_argument("--epochs", type=int, help="total epochs (phases keep their proportions)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--max-steps", type=int, help="stop after this many optimiser steps (smoke runs)")
    p.add_argument("--steps-per-epoch", type=int, help="cap steps per epoch (smoke runs)")
    p.add_argument("--input-px", type=int, help="network input size (default: the model's)")
    p.add_argument("--classes", help="comma-separated class names in output order (default: HER2 0,1+,2+,3+)")
    p.add_argument("--path-col", default="path")
    p.add_argument("--label-col", default="label")
    p.add_argument("--group-col", default=None, help="CSV column with patient/slide ids for the group split")
    p.add_argument("--pretrained-file", default=None, help="local ImageNet weights (timm .safetensors/.pth)")
    p.add_argument("--from-scratch", action="store_true", help="random initialisation (no ImageNet weights)")
    p.add_argument("--stain-norm", default="none", choices=STAIN_CHOICES,
                   help="stain normalisation for H&E models (default none; leave IHC untouched)")
    p.add_argument("--stain-ref", default=None, help="folder of reference tiles to fit the stain normaliser")
    p.add_argument("--tile-px", type=int, help="tile size cut from slides at scoring (ModelConfig.tile_px)")
    p.add_argument("--mpp", type=float, help="µm/px the tiles were cut at (ModelConfig.mpp_um)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from wsi_her2.train.data import discover_dataset
    from wsi_her2.train.evaluate import format_table
    from wsi_her2.train.recipes import describe, get_recipe, parse_overrides
    from wsi_her2.train.run import train_model

    if args.threads:
        torch.set_num_threads(args.threads)
    overrides: dict[str, object] = parse_overrides(args.overrides)
    for flag, key in (("epochs", "epochs"), ("batch_size", "batch_size"), ("lr", "lr"), ("max_steps", "max_steps"),
                      ("steps_per_epoch", "steps_per_epoch")):
        value = getattr(args, flag)
        if value is not None:
            overrides[key] = value
    recipe = get_recipe(args.recipe, {k: str(v) for k, v in overrides.items()})
    if args.show_recipe:
        print(describe(recipe))
        return 0
    if args.stain_norm in ("reinhard", "macenko") and not args.stain_ref:
        raise ConfigError(f"--stain-norm {args.stain_norm} is fitted on reference tiles; pass --stain-ref DIR")
    classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
    dataset = discover_dataset(args.data, classes=classes, path_col=args.path_col, label_col=args.label_col,
                               group_col=args.group_col)
    cfg_over = {}
    if args.tile_px:
        cfg_over["tile_px"] = args.tile_px
    if args.mpp:
        cfg_over["mpp_um"] = args.mpp
    result = train_model(
        dataset, recipe=recipe, out_dir=args.out, model_name=args.model or recipe.default_model,
        pretrained_file=args.pretrained_file, from_scratch=args.from_scratch, stain_norm=args.stain_norm,
        stain_ref=args.stain_ref, input_px=args.input_px, config_overrides=cfg_over, device=args.device,
        progress=not args.quiet and sys.stderr.isatty(), command_line=sys.argv,
    )
    fit = result.fit
    print(f"trained {result.model.wsi_her2_config.name} with recipe {recipe.name}: {fit.steps} steps, "
          f"best epoch {fit.best_epoch} ({recipe.monitor} {fit.best_metric:.4f})")
    print(f"split by group: {result.split_sizes}")
    print(f"training throughput: {fit.images_per_s:.1f} images/s ({fit.train_seconds:.1f} s training)")
    if result.test_report:
        print("held-out test split:")
        print(format_table(result.test_report))
    print(f"model: {result.paths['model']}")
    return 0
