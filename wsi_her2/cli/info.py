"""``wsi-her2 info``: levels, MPP and where it came from, vendor, tissue estimate."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from wsi_her2.cli.exits import ExitCode


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="show a slide's levels, MPP (and its source), vendor and tissue estimate")
    p.add_argument("slide", help="a slide file, or a DICOM slide's folder (or one of its .dcm files)")
    p.add_argument("--backend", choices=("auto", "openslide", "tiffslide"), default="auto")
    p.add_argument("--slide-mpp", dest="slide_mpp_um", type=float, default=None, help="override the slide's µm/px")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def slide_info(path: str, *, backend: str = "auto", slide_mpp_um: float | None = None) -> dict:
    from wsi_her2.errors import MppMissingError
    from wsi_her2.tile.pixels import read_thumbnail_or_fail
    from wsi_her2.slide import open_slide
    from wsi_her2.slide.mpp import resolve_mpp
    from wsi_her2.tile.pipeline import slide_id_for
    from wsi_her2.tile.tissue import detect_tissue

    with open_slide(path, backend=backend) as reader:
        info: dict = {
            "slide": str(path),
            "id": slide_id_for(Path(path)),
            "backend": reader.backend,
            "backend_version": reader.backend_version,
            "vendor": reader.vendor,
            "levels": [{"level": i, "width_px": lv.width_px, "height_px": lv.height_px, "downsample": round(lv.downsample, 4)}
                       for i, lv in enumerate(reader.levels)],
            "bounds_offset_px": list(reader.bounds_offset_px),
        }
        if getattr(reader, "dicom", None) is not None:
            d = reader.dicom
            info["dicom"] = {"series_uid": d.series_uid, "id_source": d.id_source, "n_files": len(d.files)}
        try:
            mpp = resolve_mpp(reader, override_mpp_um=slide_mpp_um)
        except MppMissingError as exc:
            info.update(mpp_um=None, mpp_source=None, mpp_problem=str(exc))
            return info
        info.update(mpp_um=mpp.mpp_um, mpp_source=mpp.source)
        thumb, scale = read_thumbnail_or_fail(reader, path, slide_mpp_um=mpp.mpp_um)
        tissue = detect_tissue(thumb, thumb_mpp_um=mpp.mpp_um / scale)
        info.update(
            tissue_area_mm2=round(tissue.tissue_area_mm2, 3),
            tissue_fraction=round(tissue.tissue_fraction, 4),
            pen_area_mm2=round(tissue.pen_area_mm2, 4),
            glass_rgb=[round(float(v), 1) for v in tissue.glass_rgb],
        )
    return info


def run(args: argparse.Namespace) -> int:
    info = slide_info(args.slide, backend=args.backend, slide_mpp_um=args.slide_mpp_um)
    if args.json:
        print(json.dumps(info, indent=2))
        return ExitCode.OK if info.get("mpp_um") else ExitCode.PROBLEMS
    print(f"slide    {info['slide']}")
    dicom = info.get("dicom")
    source = f" (from {dicom['id_source']}, {dicom['n_files']} DICOM files)" if dicom else ""
    print(f"id       {info['id']}{source}")
    print(f"reader   {info['backend']} ({info['backend_version']}), vendor {info['vendor']}")
    for lv in info["levels"]:
        print(f"level {lv['level']}  {lv['width_px']} x {lv['height_px']} px  downsample {lv['downsample']}")
    if info.get("mpp_um") is None:
        print(f"mpp      MISSING: {info['mpp_problem']}")
        return ExitCode.PROBLEMS
    print(f"mpp      {info['mpp_um']} µm/px (from {info['mpp_source']})")
    print(f"tissue   {info['tissue_area_mm2']} mm² ({100 * info['tissue_fraction']:.1f}% of the slide); pen ink {info['pen_area_mm2']} mm²")
    return ExitCode.OK
