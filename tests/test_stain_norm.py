"""Stain normalisation: Reinhard maps LAB statistics, Macenko recovers planted stain vectors."""
from __future__ import annotations

import numpy as np
import pytest

from wsi_her2.errors import ConfigError
from wsi_her2.stain.normalize import (
    PAPER_BREAKHIS_LAB8,
    MacenkoNormalizer,
    ReinhardNormalizer,
    estimate_stain_vectors,
    fit_stain_normalizer,
    lab8_to_cielab,
    normalizer_from_config,
    rgb_to_lab,
)

H_VEC = np.array([0.65, 0.70, 0.29])
E_VEC = np.array([0.07, 0.99, 0.11])


def _smooth_image(seed: int, base: tuple[float, float, float], spread: float, px: int = 64) -> np.ndarray:
    """Mid-tone colour field (no saturation, so Reinhard's map is not clipped by the gamut)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:px, 0:px] / px
    img = np.stack([base[c] + spread * np.sin(2 * np.pi * (xx * (c + 1) + yy * (2 - c)) + rng.uniform(0, 6))
                    for c in range(3)], axis=-1)
    img += rng.normal(0, 4, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _he_image(seed: int, px: int = 96) -> np.ndarray:
    rng = np.random.default_rng(seed)
    he = np.stack([H_VEC / np.linalg.norm(H_VEC), E_VEC / np.linalg.norm(E_VEC)], axis=1)
    conc = np.stack([rng.gamma(2.0, 0.35, px * px), rng.gamma(2.0, 0.25, px * px)])
    od = he @ conc
    rgb = 255.0 * np.exp(-od) - 1.0  # inverse of rgb_to_od: -log((I + 1) / 255)
    return np.clip(np.round(rgb.T.reshape(px, px, 3)), 0, 255).astype(np.uint8)


def test_reinhard_maps_reference_statistics_onto_target():
    source = _smooth_image(0, (170, 120, 150), 25)
    reference = _smooth_image(1, (130, 140, 110), 35)
    norm = ReinhardNormalizer.fit([reference])
    out = norm.transform(source)
    lab_out, lab_ref = rgb_to_lab(out).reshape(-1, 3), rgb_to_lab(reference).reshape(-1, 3)
    np.testing.assert_allclose(lab_out.mean(0), lab_ref.mean(0), atol=1.0)
    np.testing.assert_allclose(lab_out.std(0), lab_ref.std(0), rtol=0.06, atol=0.5)
    # and it really changed the image (the source statistics were different)
    assert np.abs(rgb_to_lab(source).reshape(-1, 3).mean(0) - lab_ref.mean(0)).max() > 5


def test_paper_fixed_targets_convert_from_opencv_lab():
    mean, std = lab8_to_cielab(PAPER_BREAKHIS_LAB8["mean"], PAPER_BREAKHIS_LAB8["std"])
    np.testing.assert_allclose(mean, [180.8 * 100 / 255, 20.6, -11.5], atol=1e-9)
    np.testing.assert_allclose(std, [35.4 * 100 / 255, 17.5, 11.1], atol=1e-9)
    norm = fit_stain_normalizer("reinhard-fixed")
    out = norm.transform(_smooth_image(2, (150, 110, 160), 30))
    lab = rgb_to_lab(out).reshape(-1, 3)
    np.testing.assert_allclose(lab.mean(0), mean, atol=1.5)


def test_reinhard_torch_matches_numpy():
    torch = pytest.importorskip("torch")
    from wsi_her2.stain.normalize import reinhard_torch

    imgs = [_smooth_image(s, (160, 120, 150), 30) for s in (3, 4)]
    norm = ReinhardNormalizer.paper_breakhis()
    expected = np.stack([norm.transform(i) for i in imgs])
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()
    got = reinhard_torch(x.double() / 255.0, norm.target_mean, norm.target_std)  # float path: [0, 1] in/out
    got8 = reinhard_torch(x, norm.target_mean, norm.target_std).permute(0, 2, 3, 1).numpy()
    assert np.abs(got8.astype(int) - expected.astype(int)).max() <= 2
    assert np.abs(got.permute(0, 2, 3, 1).numpy() * 255 - expected).max() <= 2.5


def test_macenko_recovers_planted_stain_vectors():
    he = estimate_stain_vectors(_he_image(5))
    for k, planted in enumerate((H_VEC, E_VEC)):
        cos = he[:, k] @ planted / np.linalg.norm(planted)
        assert cos > 0.98, (k, he[:, k])


def test_macenko_normalises_towards_reference_and_round_trips_config():
    ref = _he_image(6)
    norm = MacenkoNormalizer.fit([ref])
    src = (_he_image(7).astype(np.float32) * 0.8 + 40).astype(np.uint8)  # washed-out scan
    out = norm.transform(src)
    # the output's stain matrix is the reference's
    est = estimate_stain_vectors(out)
    assert (np.sum(est * norm.stain_matrix, axis=0) > 0.98).all()
    again = normalizer_from_config(norm.to_dict())
    np.testing.assert_array_equal(again.transform(src), out)


def test_config_round_trip_and_errors():
    norm = ReinhardNormalizer.paper_breakhis()
    again = normalizer_from_config(norm.to_dict())
    img = _smooth_image(8, (150, 110, 160), 30)
    np.testing.assert_array_equal(again.transform(img), norm.transform(img))
    assert normalizer_from_config(None) is None
    assert fit_stain_normalizer("none") is None
    with pytest.raises(ConfigError, match="--stain-ref"):
        fit_stain_normalizer("reinhard")
    with pytest.raises(ConfigError, match="unknown"):
        fit_stain_normalizer("vahadane")
