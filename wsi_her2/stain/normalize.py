"""Stain normalisation for H&E models: Reinhard (fitted or the published fixed targets) and Macenko.

Why this is opt-in and off for IHC
----------------------------------
A HER2 IHC grade *is* the DAB (brown) intensity and completeness of membrane staining. Reinhard
matches colour statistics and Macenko rescales stain concentrations to a reference: both would
pull a faint 1+ membrane towards the reference's brown, or damp a strong 3+, i.e. change the label
the model is asked to predict. Normalisation is therefore meant for H&E models (where HER2 is
inferred from morphology and stain colour is a nuisance), and the default everywhere is none.

The fitted parameters are a small JSON-able dict (:meth:`to_dict`) that training stores in
``ModelConfig.stain_norm``; scoring rebuilds the same normaliser with :func:`normalizer_from_config`
so that training and scoring apply identical maps.

Colour spaces
-------------
Reinhard statistics are computed in CIE L*a*b* (D65) via scikit-image. The fixed targets
published with the EfficientNetV2-S + ViT-B/16 study (BreaKHis training set) are in OpenCV's
8-bit LAB convention (``L*255/100``, ``a+128``, ``b+128``); :data:`PAPER_BREAKHIS_LAB8` keeps
them in that convention and :func:`lab8_to_cielab` converts them.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from numpy.typing import NDArray

from wsi_her2.errors import ConfigError, DatasetError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")

#: Reinhard target statistics (mean, std) in OpenCV 8-bit LAB, computed by the phased
#: EfficientNetV2-S + ViT-B/16 study over 2,000 BreaKHis training images.
PAPER_BREAKHIS_LAB8: dict[str, tuple[float, float, float]] = {
    "mean": (180.8, 148.6, 116.5),
    "std": (35.4, 17.5, 11.1),
}


def lab8_to_cielab(mean8: Sequence[float], std8: Sequence[float]) -> tuple[NDArray, NDArray]:
    """Convert OpenCV 8-bit LAB statistics to CIE L*a*b* (L in 0..100, a/b centred on 0)."""
    scale = np.array([100.0 / 255.0, 1.0, 1.0])
    mean = np.asarray(mean8, dtype=np.float64) * scale - np.array([0.0, 128.0, 128.0])
    std = np.asarray(std8, dtype=np.float64) * scale
    return mean, std


def _as_uint8_rgb(img: NDArray) -> NDArray[np.uint8]:
    arr = np.asarray(img)
    if arr.ndim != 3 or arr.shape[-1] < 3:
        raise ConfigError(f"expected an RGB image of shape (H, W, 3); got {arr.shape}")
    arr = arr[..., :3]
    if arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    return arr


def rgb_to_lab(img: NDArray) -> NDArray[np.float64]:
    """uint8 RGB (H, W, 3) -> CIE L*a*b* float64 (D65)."""
    from wsi_her2.optional import require

    require("skimage", purpose="stain normalisation")
    from skimage.color import rgb2lab

    return rgb2lab(_as_uint8_rgb(img))


def lab_to_rgb(lab: NDArray) -> NDArray[np.uint8]:
    """CIE L*a*b* (D65) -> uint8 RGB, clipped to the sRGB gamut."""
    from skimage.color import lab2rgb

    rgb = lab2rgb(np.asarray(lab, dtype=np.float64))
    return np.clip(np.round(rgb * 255.0), 0, 255).astype(np.uint8)


def load_rgb(path: str | Path) -> NDArray[np.uint8]:
    """Read an image file as uint8 RGB."""
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def list_reference_images(ref_dir: str | Path) -> list[Path]:
    """Image files under ``ref_dir`` (recursive, sorted); raises DatasetError if none."""
    root = Path(ref_dir)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise DatasetError(f"stain reference {root} does not exist; pass --stain-ref a folder of H&E tiles")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DatasetError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under stain reference {root}")
    return files


# --------------------------------------------------------------------------------------------
# Reinhard
# --------------------------------------------------------------------------------------------
@dataclass
class ReinhardNormalizer:
    """Reinhard colour transfer: match per-channel LAB mean and std to a target.

    Parameters
    ----------
    target_mean, target_std
        CIE L*a*b* statistics of the target appearance (3 values each).
    method
        Name recorded in the config (``"reinhard"`` when fitted, ``"reinhard-fixed"`` for the
        published targets).
    """

    target_mean: NDArray[np.float64]
    target_std: NDArray[np.float64]
    method: str = "reinhard"

    def __post_init__(self) -> None:
        self.target_mean = np.asarray(self.target_mean, dtype=np.float64).reshape(3)
        self.target_std = np.asarray(self.target_std, dtype=np.float64).reshape(3)

    @classmethod
    def fit(cls, images: Iterable[NDArray]) -> "ReinhardNormalizer":
        """Pool LAB statistics over a reference set (streaming: one image in memory at a time)."""
        n = 0
        s1 = np.zeros(3)
        s2 = np.zeros(3)
        for img in images:
            lab = rgb_to_lab(img).reshape(-1, 3)
            n += lab.shape[0]
            s1 += lab.sum(0)
            s2 += (lab**2).sum(0)
        if n == 0:
            raise DatasetError("cannot fit a Reinhard normaliser on an empty reference set")
        mean = s1 / n
        std = np.sqrt(np.maximum(s2 / n - mean**2, 0.0))
        return cls(mean, std, method="reinhard")

    @classmethod
    def paper_breakhis(cls) -> "ReinhardNormalizer":
        """The fixed BreaKHis targets of the phased EfficientNetV2-S + ViT-B/16 study."""
        mean, std = lab8_to_cielab(PAPER_BREAKHIS_LAB8["mean"], PAPER_BREAKHIS_LAB8["std"])
        return cls(mean, std, method="reinhard-fixed")

    def transform(self, img: NDArray) -> NDArray[np.uint8]:
        """Normalise one uint8 RGB image (H, W, 3)."""
        lab = rgb_to_lab(img)
        flat = lab.reshape(-1, 3)
        mean = flat.mean(0)
        std = flat.std(0)
        # A flat channel (e.g. a blank tile) has no spread to rescale: shift only.
        scale = np.where(std > 1e-6, self.target_std / np.maximum(std, 1e-6), 1.0)
        out = (lab - mean) * scale + self.target_mean
        return lab_to_rgb(out)

    __call__ = transform

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "space": "cielab-d65",
            "target_mean": [float(v) for v in self.target_mean],
            "target_std": [float(v) for v in self.target_std],
        }


# --------------------------------------------------------------------------------------------
# Macenko
# --------------------------------------------------------------------------------------------
def rgb_to_od(img: NDArray, *, io: float = 255.0) -> NDArray[np.float64]:
    """Optical density ``-log((I + 1) / Io)`` per channel (float64, same shape)."""
    arr = _as_uint8_rgb(img).astype(np.float64)
    return -np.log((arr + 1.0) / io)


def estimate_stain_vectors(
    img: NDArray, *, io: float = 255.0, od_threshold: float = 0.15, alpha_pct: float = 1.0
) -> NDArray[np.float64]:
    """Macenko (2009) estimate of the two stain OD vectors of an H&E image.

    Returns
    -------
    (3, 2) array, unit columns: column 0 hematoxylin, column 1 eosin (the vector with the larger
    red OD component is taken as hematoxylin, as in the reference implementation).
    """
    od = rgb_to_od(img, io=io).reshape(-1, 3)
    od = od[np.all(od > od_threshold, axis=1)]
    if od.shape[0] < 10:
        raise DatasetError(
            "too few stained pixels to estimate stain vectors (is the image blank or background?); "
            "choose reference tiles with tissue"
        )
    _, eigvecs = np.linalg.eigh(np.cov(od, rowvar=False))
    plane = eigvecs[:, 1:3]  # the two largest eigenvalues span the stain plane
    proj = od @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, [alpha_pct, 100.0 - alpha_pct])
    v_min = plane @ np.array([np.cos(lo), np.sin(lo)])
    v_max = plane @ np.array([np.cos(hi), np.sin(hi)])
    he = np.stack([v_min, v_max], axis=1) if v_min[0] > v_max[0] else np.stack([v_max, v_min], axis=1)
    he = he * np.sign(he.sum(0, keepdims=True))  # OD vectors are non-negative; fix eigenvector sign
    return he / np.linalg.norm(he, axis=0, keepdims=True)


def stain_concentrations(img: NDArray, he: NDArray, *, io: float = 255.0) -> NDArray[np.float64]:
    """Least-squares stain concentrations (2, H*W) for stain matrix ``he`` (3, 2)."""
    od = rgb_to_od(img, io=io).reshape(-1, 3).T
    conc, *_ = np.linalg.lstsq(he, od, rcond=None)
    return conc


@dataclass
class MacenkoNormalizer:
    """Macenko stain normalisation to a reference stain matrix and max concentrations."""

    stain_matrix: NDArray[np.float64]  # (3, 2)
    max_conc: NDArray[np.float64]  # (2,)
    io: float = 255.0
    method: str = "macenko"

    def __post_init__(self) -> None:
        self.stain_matrix = np.asarray(self.stain_matrix, dtype=np.float64).reshape(3, 2)
        self.max_conc = np.asarray(self.max_conc, dtype=np.float64).reshape(2)

    @classmethod
    def fit(cls, images: Iterable[NDArray], *, io: float = 255.0) -> "MacenkoNormalizer":
        """Median stain matrix and max concentrations over a reference set."""
        mats, maxes = [], []
        for img in images:
            he = estimate_stain_vectors(img, io=io)
            conc = stain_concentrations(img, he, io=io)
            mats.append(he)
            maxes.append(np.percentile(conc, 99, axis=1))
        if not mats:
            raise DatasetError("cannot fit a Macenko normaliser on an empty reference set")
        he = np.median(np.stack(mats), axis=0)
        he = he / np.linalg.norm(he, axis=0, keepdims=True)
        return cls(he, np.median(np.stack(maxes), axis=0), io=io)

    def transform(self, img: NDArray) -> NDArray[np.uint8]:
        """Normalise one uint8 RGB image (H, W, 3)."""
        arr = _as_uint8_rgb(img)
        try:
            he = estimate_stain_vectors(arr, io=self.io)
        except DatasetError:
            return arr.copy()  # background-only tile: nothing to normalise
        conc = stain_concentrations(arr, he, io=self.io)
        max_c = np.maximum(np.percentile(conc, 99, axis=1), 1e-6)
        conc = conc * (self.max_conc / max_c)[:, None]
        out = self.io * np.exp(-self.stain_matrix @ conc)
        return np.clip(np.round(out.T.reshape(arr.shape)), 0, 255).astype(np.uint8)

    __call__ = transform

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "stain_matrix": self.stain_matrix.tolist(),
            "max_conc": [float(v) for v in self.max_conc],
            "io": float(self.io),
        }


# --------------------------------------------------------------------------------------------
# Torch Reinhard (batched, device-agnostic) for scoring on GPU
# --------------------------------------------------------------------------------------------
_M_RGB2XYZ = [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]]
_WHITE_D65 = (0.95047, 1.0, 1.08883)


def _torch_rgb_to_lab(x):  # x: (B, 3, H, W) float in [0, 1]
    import torch

    lin = torch.where(x > 0.04045, ((x + 0.055) / 1.055) ** 2.4, x / 12.92)
    m = torch.tensor(_M_RGB2XYZ, dtype=x.dtype, device=x.device)
    xyz = torch.einsum("ij,bjhw->bihw", m, lin)
    white = torch.tensor(_WHITE_D65, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    t = xyz / white
    eps = (6 / 29) ** 3
    f = torch.where(t > eps, t.clamp_min(1e-12) ** (1 / 3), t / (3 * (6 / 29) ** 2) + 4 / 29)
    L = 116 * f[:, 1] - 16
    a = 500 * (f[:, 0] - f[:, 1])
    b = 200 * (f[:, 1] - f[:, 2])
    return torch.stack([L, a, b], dim=1)


def _torch_lab_to_rgb(lab):
    import torch

    fy = (lab[:, 0] + 16) / 116
    fx = fy + lab[:, 1] / 500
    fz = fy - lab[:, 2] / 200
    f = torch.stack([fx, fy, fz], dim=1)
    d = 6 / 29
    t = torch.where(f > d, f**3, 3 * d**2 * (f - 4 / 29))
    white = torch.tensor(_WHITE_D65, dtype=lab.dtype, device=lab.device).view(1, 3, 1, 1)
    xyz = t * white
    m_inv = torch.linalg.inv(torch.tensor(_M_RGB2XYZ, dtype=torch.float64)).to(lab.dtype).to(lab.device)
    lin = torch.einsum("ij,bjhw->bihw", m_inv, xyz).clamp(0, 1)
    return torch.where(lin > 0.0031308, 1.055 * lin.clamp_min(1e-12) ** (1 / 2.4) - 0.055, 12.92 * lin).clamp(0, 1)


def reinhard_torch(x, target_mean: Sequence[float], target_std: Sequence[float]):
    """Batched Reinhard on a tensor.

    Parameters
    ----------
    x
        (B, 3, H, W) RGB, uint8 (0..255) or float in [0, 1], any device.
    target_mean, target_std
        CIE L*a*b* targets, as stored by :meth:`ReinhardNormalizer.to_dict`.

    Returns
    -------
    Tensor of the input's dtype and range.
    """
    import torch

    is_uint8 = x.dtype == torch.uint8
    xf = x.float() / 255.0 if is_uint8 else x.float()
    lab = _torch_rgb_to_lab(xf)
    mean = lab.mean(dim=(2, 3), keepdim=True)
    std = lab.std(dim=(2, 3), keepdim=True, unbiased=False)
    tm = torch.as_tensor(target_mean, dtype=lab.dtype, device=lab.device).view(1, 3, 1, 1)
    ts = torch.as_tensor(target_std, dtype=lab.dtype, device=lab.device).view(1, 3, 1, 1)
    scale = torch.where(std > 1e-6, ts / std.clamp_min(1e-6), torch.ones_like(std))
    rgb = _torch_lab_to_rgb((lab - mean) * scale + tm)
    if is_uint8:
        return (rgb * 255.0).round().clamp(0, 255).to(torch.uint8)
    return rgb.to(x.dtype)


# --------------------------------------------------------------------------------------------
# Registry and config round trip
# --------------------------------------------------------------------------------------------
Normalizer = Callable[[NDArray], NDArray]

#: Choices for ``--stain-norm``; ``none`` leaves pixels untouched (the default, and right for IHC).
STAIN_METHODS = ("none", "reinhard", "reinhard-fixed", "macenko")


def fit_stain_normalizer(
    method: str, *, ref: str | Path | Sequence[NDArray] | None = None, max_images: int = 2000
) -> ReinhardNormalizer | MacenkoNormalizer | None:
    """Build a normaliser for ``method`` (fitted on ``ref`` where the method needs it).

    Parameters
    ----------
    method
        One of :data:`STAIN_METHODS`.
    ref
        A folder (or file) of reference tiles, or a sequence of uint8 RGB arrays. Not needed for
        ``reinhard-fixed`` and ``none``.
    max_images
        Cap on reference images read (the study used a 2,000-image sample).
    """
    if method not in STAIN_METHODS:
        raise ConfigError(f"unknown stain normalisation {method!r}; choose one of {', '.join(STAIN_METHODS)}")
    if method == "none":
        return None
    if method == "reinhard-fixed":
        return ReinhardNormalizer.paper_breakhis()
    if ref is None:
        raise ConfigError(f"--stain-norm {method} is fitted on reference tiles; pass --stain-ref DIR")
    if isinstance(ref, (str, Path)):
        files = list_reference_images(ref)[:max_images]
        log.info("fitting %s stain normaliser on %d reference images from %s", method, len(files), ref)
        images: Iterable[NDArray] = (load_rgb(p) for p in files)
    else:
        images = list(ref)[:max_images]
    if method == "reinhard":
        return ReinhardNormalizer.fit(images)
    return MacenkoNormalizer.fit(images)


def normalizer_from_config(cfg: dict[str, Any] | None) -> ReinhardNormalizer | MacenkoNormalizer | None:
    """Rebuild the normaliser recorded in ``ModelConfig.stain_norm`` (None -> None)."""
    if not cfg:
        return None
    method = cfg.get("method")
    if method in ("reinhard", "reinhard-fixed"):
        return ReinhardNormalizer(cfg["target_mean"], cfg["target_std"], method=method)
    if method == "macenko":
        return MacenkoNormalizer(cfg["stain_matrix"], cfg["max_conc"], io=float(cfg.get("io", 255.0)))
    raise ConfigError(f"model config names an unknown stain normalisation {method!r}")


def apply_stain_norm_torch(x, cfg: dict[str, Any] | None):
    """Apply a recorded normaliser to a (B, 3, H, W) uint8/float tensor.

    Reinhard runs batched in torch on the tensor's device; Macenko runs per tile in numpy (its
    per-image eigen-decomposition and percentiles gain little from batching).
    """
    if not cfg:
        return x
    if cfg.get("method") in ("reinhard", "reinhard-fixed"):
        return reinhard_torch(x, cfg["target_mean"], cfg["target_std"])
    import torch

    norm = normalizer_from_config(cfg)
    is_uint8 = x.dtype == torch.uint8
    arr = x.detach().cpu()
    arr = arr if is_uint8 else (arr.float() * 255).round().clamp(0, 255).to(torch.uint8)
    out = np.stack([norm.transform(a.permute(1, 2, 0).numpy()) for a in arr])
    t = torch.from_numpy(out).permute(0, 3, 1, 2).to(x.device)
    return t if is_uint8 else (t.float() / 255.0).to(x.dtype)
