"""Readable pictures: nearest-neighbour upsampling to a legible size, wrapped titles and legends,
colour bars. Shared by the heatmaps and the QC picture.

A thumbnail of a 1.4 mm core is ~180 px at 8 µm/px; shown as is, its title is cut and nothing
can be read. Every picture is therefore enlarged by an integer factor (nearest neighbour: each
thumbnail pixel becomes a sharp square, no blur, no invented detail) until its long side is at
least :data:`MIN_LONG_SIDE_PX`, and text is wrapped to the picture's width, never cut.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw, ImageFont

MIN_LONG_SIDE_PX = 1000
_PAD_PX = 8


def display_zoom(height_px: int, width_px: int, *, min_long_side_px: int = MIN_LONG_SIDE_PX) -> int:
    """Integer zoom that brings the long side to at least ``min_long_side_px`` (1 if it already is)."""
    return max(1, math.ceil(min_long_side_px / max(height_px, width_px, 1)))


def upsample_nearest(image: NDArray, zoom: int) -> NDArray:
    """Each pixel becomes a ``zoom`` x ``zoom`` square (no interpolation)."""
    if zoom <= 1:
        return image
    return np.repeat(np.repeat(image, zoom, axis=0), zoom, axis=1)


def font(size_px: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size_px)
    except TypeError:  # Pillow < 10.1: fixed bitmap font
        return ImageFont.load_default()


def font_px_for(width_px: int) -> int:
    """Text size for a picture ``width_px`` wide: ~1/55 of the width, 16-28 px."""
    return int(min(28, max(16, width_px // 55)))


def wrap_text(text: str, width_px: int, draw: ImageDraw.ImageDraw, fnt) -> list[str]:
    """Greedy word wrap so that no line is wider than ``width_px`` (a single long word is split)."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            trial = f"{line} {word}" if line else word
            if draw.textlength(trial, font=fnt) <= width_px:
                line = trial
                continue
            if line:
                lines.append(line)
            while draw.textlength(word, font=fnt) > width_px and len(word) > 1:
                cut = max(1, int(len(word) * width_px / draw.textlength(word, font=fnt)) - 1)
                lines.append(word[:cut])
                word = word[cut:]
            line = word
        lines.append(line)
    return lines


def _legend_rows(entries, width_px, draw, fnt, swatch_px):
    rows: list[list[tuple[str, tuple[int, int, int], int]]] = [[]]
    x = _PAD_PX
    for label, rgb in entries:
        item_w = swatch_px + 6 + math.ceil(draw.textlength(label, font=fnt)) + 2 * _PAD_PX
        if rows[-1] and x + item_w > width_px:
            rows.append([])
            x = _PAD_PX
        rows[-1].append((label, rgb, x))
        x += item_w
    return rows


def colorbar_strip(width_px: int, *, vmin: float, vmax: float, label: str, lut: NDArray[np.uint8],
                   font_px: int) -> Image.Image:
    """A horizontal colour bar with the measure's name and five tick values."""
    fnt = font(font_px)
    bar_h = max(14, font_px)
    x0, x1 = _PAD_PX * 4, width_px - _PAD_PX * 4
    height = font_px + 4 + bar_h + 6 + font_px + 2 * _PAD_PX
    strip = Image.new("RGB", (width_px, height), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    draw.text((x0, _PAD_PX // 2), label, fill=(0, 0, 0), font=fnt)
    top = _PAD_PX // 2 + font_px + 4
    ramp = lut[np.linspace(0, 255, max(x1 - x0, 2)).round().astype(int)]
    strip.paste(Image.fromarray(np.repeat(ramp[None], bar_h, axis=0)), (x0, top))
    draw.rectangle([x0 - 1, top - 1, x1, top + bar_h], outline=(0, 0, 0))
    for k in range(5):
        x = x0 + (x1 - x0) * k / 4
        text = f"{vmin + (vmax - vmin) * k / 4:.3g}"
        tw = draw.textlength(text, font=fnt)
        draw.line([x, top + bar_h, x, top + bar_h + 4], fill=(0, 0, 0))
        draw.text((min(max(x - tw / 2, 0), width_px - tw), top + bar_h + 6), text, fill=(0, 0, 0), font=fnt)
    return strip


def viridis_lut() -> NDArray[np.uint8]:
    """256 x 3 RGB viridis (perceptually uniform, readable in grey and by colour-blind readers)."""
    lut = cv2.applyColorMap(np.arange(256, dtype=np.uint8).reshape(256, 1), cv2.COLORMAP_VIRIDIS)
    return lut.reshape(256, 3)[:, ::-1].copy()  # BGR -> RGB


def compose(
    image: Image.Image,
    *,
    title: str | None = None,
    legend: Sequence[tuple[str, tuple[int, int, int]]] = (),
    below: Image.Image | None = None,
    outline_swatches: bool = False,
) -> Image.Image:
    """``image`` with a wrapped title above and a wrapped legend (and e.g. a colour bar) below."""
    width = image.width
    font_px = font_px_for(width)
    fnt = font(font_px)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = font_px + _PAD_PX
    title_lines = wrap_text(title, width - 2 * _PAD_PX, probe, fnt) if title else []
    title_h = len(title_lines) * line_h + _PAD_PX if title_lines else 0
    swatch = font_px
    rows = _legend_rows(list(legend), width, probe, fnt, swatch) if legend else []
    legend_h = len(rows) * line_h + _PAD_PX if rows else 0
    below_h = below.height if below is not None else 0
    canvas = Image.new("RGB", (width, title_h + image.height + legend_h + below_h), (255, 255, 255))
    canvas.paste(image, (0, title_h))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(title_lines):
        draw.text((_PAD_PX, _PAD_PX // 2 + i * line_h), line, fill=(0, 0, 0), font=fnt)
    for r, row in enumerate(rows):
        y = title_h + image.height + _PAD_PX // 2 + r * line_h
        for label, rgb, x in row:
            outline = rgb if not outline_swatches else (0, 0, 0)
            fill = rgb if not outline_swatches else None
            draw.rectangle([x, y, x + swatch - 1, y + swatch - 1], fill=fill, outline=outline, width=3 if outline_swatches else 1)
            if outline_swatches:
                draw.rectangle([x + 2, y + 2, x + swatch - 3, y + swatch - 3], outline=rgb, width=3)
            draw.text((x + swatch + 6, y), label, fill=(0, 0, 0), font=fnt)
    if below is not None:
        canvas.paste(below, (0, title_h + image.height + legend_h))
    return canvas
