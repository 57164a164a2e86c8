"""Colour deconvolution of brightfield RGB into stain optical densities, in pure torch.

Beer-Lambert: a stain layer of optical density ``OD`` transmits ``I / I0 = 10 ** -OD`` of the
light in each channel. Optical densities are **decimal** (log base 10, the convention of QuPath
and of Ruifrok & Johnston 2001) and are taken relative to a background (glass) intensity
``I0``: ``OD_c = -log10(I_c / I0_c)`` with ``I`` and ``I0`` in [0, 1]. Stains then separate
linearly: ``OD_rgb = concentrations @ RGB_FROM_HED``.

``RGB_FROM_HED`` is the Ruifrok & Johnston (2001) hematoxylin / eosin / DAB matrix, identical
to ``skimage.color.rgb_from_hed`` (rows are stains, columns R, G, B). With ``I0 = 1`` the result
equals ``6 * skimage.color.rgb2hed(rgb)``: scikit-image divides natural-log OD by ``ln(1e-6)``,
which is decimal OD divided by 6. For IHC the middle (eosin) channel is a residual: it collects
whatever is neither hematoxylin nor DAB (colour casts, JPEG artefacts).

Everything here runs batched on CPU or CUDA and keeps the log arithmetic in float32 even under
autocast, because bf16 has too few mantissa bits for ``log10`` of near-white pixels.
"""
from __future__ import annotations

import torch

__all__ = [
    "RGB_FROM_HED",
    "HED_FROM_RGB",
    "MIN_INTENSITY",
    "estimate_background",
    "rgb_to_od",
    "od_to_hed",
    "rgb_to_hed_od",
    "RGB_FROM_HND",
    "od_to_hnd",
]

#: Ruifrok & Johnston (2001) stain OD vectors (rows: hematoxylin, eosin, DAB; columns: R, G, B),
#: exactly as in ``skimage.color.rgb_from_hed`` (rows are unit length to within 0.5 %).
RGB_FROM_HED = torch.tensor(
    [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float64
)
#: Inverse of :data:`RGB_FROM_HED` (float64, cast on use): ``hed = od_rgb @ HED_FROM_RGB``.
HED_FROM_RGB = torch.linalg.inv(RGB_FROM_HED)

#: Hematoxylin, **neutral** and DAB unit OD vectors (rows; columns R, G, B) for IHC.
#:
#: Why a neutral third vector instead of eosin: IHC has no eosin, and the Ruifrok matrix sends
#: achromatic absorbance (section thickness, dense stroma, muscle, a grey scanner cast) partly
#: into DAB: a neutral OD of 1 reads as 0.51 DAB. DAB is brown, i.e. its OD has a hue (blue
#: absorbed ~3x more than red); grey absorbance has none. With a neutral vector in the basis,
#: grey goes to its own channel and DAB holds only brown: unstained tissue of any density reads
#: ~0 DAB, while pure DAB still unmixes exactly onto DAB.
RGB_FROM_HND = torch.nn.functional.normalize(
    torch.tensor([[0.65, 0.70, 0.29], [1.0, 1.0, 1.0], [0.27, 0.57, 0.78]], dtype=torch.float64), dim=1
)
HND_FROM_RGB = torch.linalg.inv(RGB_FROM_HND)

#: Intensities are clamped to at least one 8-bit grey level before the log, so a black pixel
#: reads as OD ~2.4 rather than infinity (8-bit scanners cannot measure beyond that anyway).
MIN_INTENSITY = 1.0 / 255.0


def estimate_background(
    x: torch.Tensor,
    *,
    quantile: float = 0.99,
    min_intensity: float = 0.65,
    max_cast: float = 0.06,
    glass_chroma: torch.Tensor | None = None,
) -> torch.Tensor:
    """Estimate each tile's glass intensity ``I0`` per channel from its brightest pixels.

    The tile-level counterpart of QuPath's "estimate background" step: scanners and JPEG
    pipelines often render glass as grey (some real IHC sets sit at ~180/255), and measuring OD
    against pure white would then add ~0.15 neutral OD to every pixel, which the Ruifrok
    matrix turns into ~0.13 fake DAB.

    Parameters
    ----------
    x
        ``(B, 3, H, W)`` RGB in [0, 1].
    quantile
        Per-channel intensity quantile taken as glass (robust to a few saturated pixels).
    min_intensity
        Lower clamp: a tile with no glass at all (solid tissue) cannot pull ``I0`` below this,
        which caps the OD lost on such tiles at ``-log10(min_intensity)``.
    max_cast
        Largest colour cast allowed in the estimate, as a fraction of the brightest channel.
        Glass is near-neutral; a strongly tinted "background" is stained tissue, and letting
        it through would white-balance the stain away.
    glass_chroma
        ``(3,)`` colour of the slide's glass, each channel over the brightest (e.g. ``(1, 0.98,
        0.88)`` for yellowish glass), when the slide shows glass. The cast is then measured from
        the glass colour rather than from grey: a tile of tissue only keeps the glass's tint in
        ``I0`` instead of having it read as stain (a yellow cast is DAB-coloured). None: grey.

    Returns
    -------
    torch.Tensor
        ``(B, 3, 1, 1)`` float32 background intensities in ``[min_intensity, 1]``.
    """
    b, c, h, w = x.shape
    flat = x.detach().float().reshape(b, c, h * w)
    k = min(h * w, max(1, int(round(quantile * h * w))))
    i0 = flat.kthvalue(k, dim=2).values  # (B, C)
    chroma = None if glass_chroma is None else glass_chroma.to(i0.device, torch.float32).reshape(1, c)
    if chroma is not None:
        i0 = i0 / chroma  # in units of the glass colour: its own tint is no cast
    brightest = i0.amax(dim=1, keepdim=True)
    i0 = torch.maximum(i0, brightest * (1.0 - max_cast))
    if chroma is not None:
        i0 = i0 * chroma
    return i0.clamp(min_intensity, 1.0).reshape(b, c, 1, 1)


def rgb_to_od(x: torch.Tensor, background: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Decimal optical density ``-log10(I / I0)`` per channel, in float32.

    Parameters
    ----------
    x
        ``(B, 3, H, W)`` RGB in [0, 1] (any float dtype; computed in float32).
    background
        ``I0``: a scalar or a tensor broadcastable to ``x`` (e.g. from
        :func:`estimate_background`). Pixels brighter than ``I0`` get a small negative OD;
        callers clamp where that matters.
    """
    x32 = x.float().clamp(min=MIN_INTENSITY)
    i0 = torch.as_tensor(background, dtype=torch.float32, device=x.device)
    return -torch.log10(x32 / i0)


def od_to_hed(od: torch.Tensor) -> torch.Tensor:
    """Unmix ``(B, 3, H, W)`` RGB optical density into hematoxylin, eosin/residual, DAB OD."""
    m = HED_FROM_RGB.to(device=od.device, dtype=torch.float32)
    return torch.einsum("bchw,cs->bshw", od.float(), m)


def od_to_hnd(od: torch.Tensor) -> torch.Tensor:
    """Unmix ``(B, 3, H, W)`` RGB optical density into hematoxylin, neutral, DAB OD (see :data:`RGB_FROM_HND`)."""
    m = HND_FROM_RGB.to(device=od.device, dtype=torch.float32)
    return torch.einsum("bchw,cs->bshw", od.float(), m)


def rgb_to_hed_od(x: torch.Tensor, background: torch.Tensor | float = 1.0) -> torch.Tensor:
    """RGB ``(B, 3, H, W)`` in [0, 1] to stain OD ``(B, 3, H, W)``: channels H, E/residual, DAB.

    Not clamped; with ``background=1`` it equals ``6 * skimage.color.rgb2hed`` wherever
    scikit-image's clamp at zero does not bite.
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        return od_to_hed(rgb_to_od(x, background))
