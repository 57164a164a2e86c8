"""Batched inference over a patch store: same numbers as calling the model directly, in order."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from wsi_her2.errors import ConfigError
from wsi_her2.score.inference import InferenceConfig, predict_store, preprocess_tiles, resolve_device
from wsi_her2.score.loader import TileLoader, chunk_groups
from wsi_her2.models.config import ModelConfig
from wsi_her2.store.patch_store import PatchStore, open_store

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
CMU = FIXTURES / "slides" / "CMU-1-Small-Region.svs"
MEAN = (0.5, 0.4, 0.3)
STD = (0.2, 0.25, 0.3)


# --------------------------------------------------------------------------------------------
# Stand-in models and stores
# --------------------------------------------------------------------------------------------
def _config(*, tile_px: int = 32, input_px: int = 32, n_classes: int = 4, mean=MEAN, std=STD) -> ModelConfig:
    classes = tuple(f"c{i}" for i in range(n_classes))
    return ModelConfig(name="standin", arch="standin", classes=classes, tile_px=tile_px, input_px=input_px,
                       mean=mean, std=std, head="none")


class OrientedNet(nn.Module):
    """A small CNN: a 3x3 conv, ReLU, a strided pool, a linear layer on the flattened map.

    The flatten keeps positions, so its output changes when the tile is flipped or rotated.
    """

    def __init__(self, cfg: ModelConfig, *, seed: int = 0, record: bool = False) -> None:
        super().__init__()
        self.record = record
        g = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 4 * 4, cfg.n_classes)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        self.wsi_her2_config = cfg
        self.seen_shapes: list[tuple[int, ...]] = []
        self.seen_inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.record:
            self.seen_shapes.append(tuple(x.shape))
            self.seen_inputs.append(x.detach().float().cpu().clone())
        y = F.adaptive_avg_pool2d(torch.relu(self.conv(x)), 4)
        return self.fc(y.flatten(1)) * 3.0


class InvariantNet(nn.Module):
    """Pixel-wise 1x1 conv, ReLU, global mean: invariant to any permutation of pixels, so to D4."""

    def __init__(self, cfg: ModelConfig, *, seed: int = 1) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.pix = nn.Conv2d(3, 8, 1)
        self.fc = nn.Linear(8, cfg.n_classes)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        self.wsi_her2_config = cfg

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.pix(x)).mean(dim=(2, 3))) * 3.0


class MeasuringNet(OrientedNet):
    """A stand-in with ``measure()``: per-tile mean red intensity (normalised units) and probs."""

    def measure(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"red_mean": x[:, 0].mean(dim=(1, 2)), "probs": torch.softmax(self.forward(x), dim=1)}


def _tiles(n: int, tile_px: int, *, seed: int = 0) -> np.ndarray:
    """Random textured tiles whose brightness grows with the index, so a reordering shows."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 120, size=(n, tile_px, tile_px, 3))
    level = np.linspace(0, 130, n).astype(int)[:, None, None, None]
    return (base + level).clip(0, 255).astype(np.uint8)


def _make_store(path: Path, tiles: np.ndarray, *, chunk_tiles: int, qc_flags: np.ndarray | None = None) -> PatchStore:
    n, tile_px = tiles.shape[0], tiles.shape[1]
    flags = np.zeros(n, dtype=np.uint8) if qc_flags is None else qc_flags.astype(np.uint8)
    store = PatchStore.create(
        path, n_tiles=n, tile_px=tile_px, chunk_tiles=chunk_tiles, codec="zstd",
        attrs={"tiling": {"effective_mpp_um": 0.5, "tile_px": tile_px}},
        per_tile={"qc_flags": flags}, images={},
    )
    store.write_tiles(0, tiles)
    store.update_attrs(complete=True)
    return open_store(path)


def _reference_probs(model: nn.Module, tiles: np.ndarray, *, views=("identity",)) -> np.ndarray:
    """Probabilities computed the plain way: all tiles at once, no loader, no store."""
    cfg = model.wsi_her2_config
    x = torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255.0
    if x.shape[-1] != cfg.input_px:
        x = F.interpolate(x, size=(cfg.input_px, cfg.input_px), mode="bilinear", align_corners=False, antialias=True)
    x = (x - torch.tensor(cfg.mean).view(1, 3, 1, 1)) / torch.tensor(cfg.std).view(1, 3, 1, 1)
    out = []
    with torch.no_grad():
        for v in views:
            xv = {
                "identity": x, "hflip": x.flip(-1), "vflip": x.flip(-2), "rot90": x.rot90(1, (-2, -1)),
                "rot180": x.rot90(2, (-2, -1)), "rot270": x.rot90(3, (-2, -1)), "transpose": x.transpose(-2, -1),
                "antitranspose": x.rot90(2, (-2, -1)).transpose(-2, -1),
            }[v]
            out.append(torch.softmax(model(xv), dim=1))
    return torch.stack(out).mean(0).numpy()


CPU = InferenceConfig(device="cpu", batch_size=5, loader_workers=2)


@pytest.fixture(scope="module")
def qc_store(tmp_path_factory):
    """37 tiles of 32 px in chunks of 8; every fourth tile and tile 36 fail QC."""
    tiles = _tiles(37, 32)
    flags = np.zeros(37, dtype=np.uint8)
    flags[::4] = 1
    flags[36] = 2
    store = _make_store(tmp_path_factory.mktemp("stores") / "qc.zarr", tiles, chunk_tiles=8, qc_flags=flags)
    return store, tiles, flags == 0


# --------------------------------------------------------------------------------------------
# Correctness
# --------------------------------------------------------------------------------------------
def test_full_path_matches_direct_model_call_in_order_with_nan_for_rejected(qc_store):
    store, tiles, passed = qc_store
    model = OrientedNet(_config())
    result = predict_store(store, model, config=CPU)
    expected = _reference_probs(model, tiles)
    assert result.probs.shape == (37, 4) and result.probs.dtype == np.float32
    np.testing.assert_array_equal(result.scored, passed)
    assert np.isnan(result.probs[~passed]).all()
    np.testing.assert_allclose(result.probs[passed], expected[passed], rtol=1e-5, atol=1e-6)
    # The tiles differ enough that any reordering of rows would break the match above.
    assert np.abs(np.diff(expected[passed], axis=0)).max() > 1e-3
    assert result.device == "cpu" and result.tiles_per_s > 0
    assert result.measurements == {}


def test_probabilities_do_not_depend_on_batch_size(qc_store):
    store, _, passed = qc_store
    model = OrientedNet(_config())
    runs = [predict_store(store, model, config=InferenceConfig(device="cpu", batch_size=b, loader_workers=w)).probs
            for b, w in ((1, 1), (3, 2), (8, 3), (64, 2))]
    for other in runs[1:]:
        np.testing.assert_allclose(other[passed], runs[0][passed], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(np.isnan(other), np.isnan(runs[0]))


def test_explicit_indices_score_only_those_tiles(qc_store):
    store, tiles, _ = qc_store
    model = OrientedNet(_config())
    wanted = np.array([30, 4, 9, 4, 0, 17])  # unsorted, a duplicate, QC-rejected ones too
    result = predict_store(store, model, config=CPU, indices=wanted)
    chosen = np.unique(wanted)
    assert np.flatnonzero(result.scored).tolist() == chosen.tolist()
    np.testing.assert_allclose(result.probs[chosen], _reference_probs(model, tiles[chosen]), rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError):
        predict_store(store, model, config=CPU, indices=np.array([37]))


def test_no_passed_tiles_gives_all_nan(tmp_path):
    tiles = _tiles(6, 32)
    store = _make_store(tmp_path / "none.zarr", tiles, chunk_tiles=4, qc_flags=np.ones(6))
    result = predict_store(store, OrientedNet(_config()), config=CPU)
    assert np.isnan(result.probs).all() and not result.scored.any() and result.tiles_per_s == 0.0


def test_measurements_come_from_measure_and_are_nan_where_not_scored(qc_store):
    store, tiles, passed = qc_store
    model = MeasuringNet(_config())
    result = predict_store(store, model, config=CPU)
    assert set(result.measurements) == {"red_mean"}
    red = result.measurements["red_mean"]
    assert red.shape == (37,) and red.dtype == np.float32 and np.isnan(red[~passed]).all()
    expected_red = ((tiles[..., 0] / 255.0).mean(axis=(1, 2)) - MEAN[0]) / STD[0]
    np.testing.assert_allclose(red[passed], expected_red[passed], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(result.probs[passed], _reference_probs(model, tiles)[passed], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# TTA and resizing
# --------------------------------------------------------------------------------------------
def test_tta_leaves_a_rotation_invariant_model_unchanged(qc_store):
    store, _, passed = qc_store
    model = InvariantNet(_config())
    plain = predict_store(store, model, config=CPU).probs
    tta = predict_store(store, model, config=InferenceConfig(device="cpu", batch_size=5, tta=True)).probs
    np.testing.assert_allclose(tta[passed], plain[passed], rtol=1e-5, atol=1e-6)


def test_tta_averages_the_eight_views_of_an_oriented_model(qc_store):
    store, tiles, passed = qc_store
    model = OrientedNet(_config())
    plain = predict_store(store, model, config=CPU).probs
    tta = predict_store(store, model, config=InferenceConfig(device="cpu", batch_size=5, tta=True)).probs
    assert np.abs(tta[passed] - plain[passed]).max() > 1e-2
    views = ("identity", "hflip", "vflip", "rot90", "rot180", "rot270", "transpose", "antitranspose")
    expected = _reference_probs(model, tiles, views=views)
    np.testing.assert_allclose(tta[passed], expected[passed], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(tta[passed].sum(axis=1), 1.0, atol=1e-5)


def test_unknown_tta_set_is_a_config_error(qc_store):
    store, _, _ = qc_store
    with pytest.raises(ConfigError, match="TTA"):
        predict_store(store, OrientedNet(_config()), config=InferenceConfig(device="cpu", tta="spin"))


def test_tiles_are_resized_to_input_px_with_antialiasing(tmp_path):
    from PIL import Image

    tiles = _tiles(6, 48, seed=3)
    store = _make_store(tmp_path / "big.zarr", tiles, chunk_tiles=4)
    model = OrientedNet(_config(tile_px=48, input_px=32), record=True)
    result = predict_store(store, model, config=InferenceConfig(device="cpu", batch_size=4))
    assert {s[1:] for s in model.seen_shapes} == {(3, 32, 32)}
    np.testing.assert_allclose(result.probs, _reference_probs(model, tiles), rtol=1e-5, atol=1e-6)
    # Independent check against PIL's (antialiased) bilinear resize of the uint8 tiles.
    seen = torch.cat(model.seen_inputs[:2])  # the predict run's inputs, in tile order
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    pil = np.stack([np.asarray(Image.fromarray(t).resize((32, 32), Image.BILINEAR)) for t in tiles])
    pil_x = (torch.from_numpy(pil).permute(0, 3, 1, 2).float() / 255.0 - mean) / std
    err_in_levels = ((seen - pil_x) * std * 255.0).abs()
    assert err_in_levels.max() <= 1.5  # rounding of PIL's uint8 output, nothing more


def test_preprocess_layout_and_normalisation():
    x = torch.full((2, 8, 8, 3), 255, dtype=torch.uint8)
    y = preprocess_tiles(x, input_px=8, mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0), channels_last=True)
    assert y.shape == (2, 3, 8, 8) and y.is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_allclose(y[0, :, 0, 0].numpy(), [2.0, 1.0, 0.5])


# --------------------------------------------------------------------------------------------
# Loader: chunk-aligned, bounded, errors surface
# --------------------------------------------------------------------------------------------
class _CountingStore:
    def __init__(self, store: PatchStore, *, fail_at: int | None = None) -> None:
        self._store = store
        self.reads: list[tuple[int, int]] = []
        self.fail_at = fail_at
        self.tile_px, self.chunk_tiles, self.n_tiles = store.tile_px, store.chunk_tiles, store.n_tiles
        self.qc_pass = store.qc_pass

    def read_tiles(self, start: int, stop: int) -> np.ndarray:
        if self.fail_at is not None and start <= self.fail_at < stop:
            raise OSError("simulated unreadable chunk")
        self.reads.append((start, stop))
        return self._store.read_tiles(start, stop)


def test_loader_decompresses_each_chunk_once_and_keeps_order(qc_store):
    store, tiles, passed = qc_store
    counting = _CountingStore(store)
    idx = np.flatnonzero(passed)
    seen = []
    with TileLoader(counting, idx, batch_size=3, workers=2) as loader:
        for batch in loader:
            np.testing.assert_array_equal(batch.tiles.numpy(), tiles[batch.indices])
            seen.extend(batch.indices.tolist())
            loader.release(batch)
    assert seen == idx.tolist()
    chunks = [start // 8 for start, _ in counting.reads]
    assert sorted(chunks) == sorted(set(chunks)) == sorted(set((idx // 8).tolist()))
    assert all((stop - 1) // 8 == start // 8 for start, stop in counting.reads)
    assert len(loader._slots) <= 5  # the ring of buffers is a small constant


def test_chunk_groups_split_at_chunk_borders():
    assert chunk_groups(np.array([1, 2, 7, 8, 20]), 8) == [(0, 3), (3, 4), (4, 5)]
    assert chunk_groups(np.array([], dtype=np.int64), 8) == []


def test_a_read_error_reaches_the_caller_instead_of_hanging(qc_store):
    store, _, _ = qc_store
    failing = _CountingStore(store, fail_at=21)
    with pytest.raises(OSError, match="simulated"):
        predict_store(failing, OrientedNet(_config()), config=CPU)


# --------------------------------------------------------------------------------------------
# Devices
# --------------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_requested_without_cuda_is_a_config_error(qc_store):
    with pytest.raises(ConfigError, match="--device cpu"):
        resolve_device("cuda")
    store, _, _ = qc_store
    with pytest.raises(ConfigError):
        predict_store(store, OrientedNet(_config()), config=InferenceConfig(device="cuda"))


def test_device_names():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="unknown device"):
        resolve_device("tpu")
    with pytest.raises(ConfigError):
        InferenceConfig(batch_size=0).validate()


def test_model_without_config_is_refused(qc_store):
    store, _, _ = qc_store
    with pytest.raises(ConfigError, match="wsi_her2_config"):
        predict_store(store, nn.Conv2d(3, 4, 1), config=CPU)


def test_amp_is_float32_on_cpu_unless_always(qc_store):
    store, tiles, passed = qc_store
    model = OrientedNet(_config())
    expected = _reference_probs(model, tiles)[passed]
    default = predict_store(store, model, config=InferenceConfig(device="cpu", batch_size=5, amp=True)).probs
    np.testing.assert_allclose(default[passed], expected, rtol=1e-5, atol=1e-6)
    bf16 = predict_store(store, model, config=InferenceConfig(device="cpu", batch_size=5, amp="always")).probs
    assert 1e-6 < np.abs(bf16[passed] - expected).max() < 5e-2
    with pytest.raises(ConfigError):
        InferenceConfig(amp="fp16").validate()


def test_step_cache_reuses_the_step_and_leaves_the_model_untouched(qc_store, monkeypatch):
    import wsi_her2.score.inference as inference

    built = []
    make_step = inference._make_step
    monkeypatch.setattr(inference, "_make_step", lambda *a, **k: built.append(1) or make_step(*a, **k))
    store, _, passed = qc_store
    model = OrientedNet(_config())
    attrs_before = set(vars(model))
    cache = inference.StepCache()
    first = predict_store(store, model, config=CPU, step_cache=cache).probs
    second = predict_store(store, model, config=CPU, step_cache=cache).probs
    assert len(built) == 1 and len(cache) == 1  # the second call reused the first call's step
    np.testing.assert_array_equal(first[passed], second[passed])
    assert set(vars(model)) == attrs_before  # nothing cached on the caller's model
    predict_store(store, model, config=InferenceConfig(device="cpu", batch_size=5, tta="flips"), step_cache=cache)
    predict_store(store, OrientedNet(_config()), config=CPU, step_cache=cache)
    assert len(built) == 3 and len(cache) == 3  # other settings, another model: steps of their own
    predict_store(store, model, config=CPU)  # no cache given: a fresh step for this call only
    assert len(built) == 4 and len(cache) == 3


def test_cudnn_autotune_is_set_by_the_command_line_for_its_run_and_put_back(monkeypatch):
    from wsi_her2.cli.common import cudnn_autotune

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with cudnn_autotune("cuda"):
        assert torch.backends.cudnn.benchmark is True
    assert torch.backends.cudnn.benchmark is False
    with cudnn_autotune("cpu"):
        assert torch.backends.cudnn.benchmark is False  # nothing to tune on the CPU
    with pytest.raises(RuntimeError), cudnn_autotune("auto"):
        raise RuntimeError("a failing run still puts the flag back")
    assert torch.backends.cudnn.benchmark is False


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(qc_store):
    store, _, passed = qc_store
    model = OrientedNet(_config())
    cpu = predict_store(store, model, config=CPU).probs
    exact = predict_store(store, model, config=InferenceConfig(device="cuda", batch_size=5, amp=False))
    assert exact.device.startswith("cuda")
    np.testing.assert_allclose(exact.probs[passed], cpu[passed], rtol=1e-3, atol=1e-4)
    np.testing.assert_array_equal(exact.scored, passed)
    from wsi_her2.score.inference import StepCache

    cache = StepCache()
    fast = predict_store(store, model, config=InferenceConfig(device="cuda", batch_size=5, tta=True, compile=True),
                         step_cache=cache)
    again = predict_store(store, model, config=InferenceConfig(device="cuda", batch_size=5, tta=True, compile=True),
                          step_cache=cache)
    assert len(cache) == 1 and not any("compiled" in k for k in vars(model))  # compiled once, held by the caller
    np.testing.assert_allclose(again.probs[passed], fast.probs[passed], atol=1e-6)
    slow = predict_store(store, model.cpu(), config=InferenceConfig(device="cpu", batch_size=5, tta=True))
    np.testing.assert_allclose(fast.probs[passed], slow.probs[passed], atol=3e-2)  # bf16


# --------------------------------------------------------------------------------------------
# Real data
# --------------------------------------------------------------------------------------------
def test_ihc_dab_scorer_through_the_full_path(tmp_path):
    pytest.importorskip("wsi_her2.models.ihc_score")
    from wsi_her2.models import create_model

    tiles = _tiles(5, 64, seed=5)
    store = _make_store(tmp_path / "ihc.zarr", tiles, chunk_tiles=2, qc_flags=np.array([0, 1, 0, 0, 0]))
    model = create_model("ihc_dab", tile_px=64, input_px=64)
    result = predict_store(store, model, config=InferenceConfig(device="cpu", batch_size=3))
    passed = result.scored
    assert passed.tolist() == [True, False, True, True, True]
    with torch.no_grad():
        direct = model.measure(torch.from_numpy(tiles[passed]).permute(0, 3, 1, 2).float() / 255.0)
    np.testing.assert_allclose(result.probs[passed], direct["probs"].numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(result.measurements["cell_count"][passed], direct["cell_count"].numpy(), rtol=1e-5)
    assert np.isnan(result.measurements["cell_count"][1])


@pytest.mark.skipif(not CMU.is_file(), reason="shared fixtures absent")
def test_real_slide_store_scores_its_qc_passed_tiles(tmp_path):
    from wsi_her2.tile.pipeline import TileConfig, tile_slide

    tiled = tile_slide(CMU, tmp_path, config=TileConfig(tile_px=224, target_mpp_um=0.5, qc_png=False))
    store = open_store(tiled.store)
    model = OrientedNet(_config(tile_px=224, input_px=32))
    result = predict_store(store, model, config=InferenceConfig(device="cpu", batch_size=16))
    passed = store.qc_pass
    assert 0 < passed.sum() < store.n_tiles
    np.testing.assert_array_equal(result.scored, passed)
    expected = _reference_probs(model, store.read_tiles(0, store.n_tiles))
    np.testing.assert_allclose(result.probs[passed], expected[passed], rtol=1e-4, atol=1e-5)


def test_loader_threads_follow_the_device(monkeypatch):
    """Decoding feeds a GPU: more reading threads on CUDA; 2 on CPU, where the model needs the cores."""
    from wsi_her2.score import cpu_pool, inference

    monkeypatch.setattr(cpu_pool, "available_cpus", lambda: 16)
    cpu_plan, cuda_plan = inference._plan_run(InferenceConfig(device="cpu")), SimpleNamespace(cuda=True)
    assert inference.loader_threads(InferenceConfig(), cpu_plan) == 2
    assert inference.loader_threads(InferenceConfig(), cuda_plan) == 8
    assert inference.loader_threads(InferenceConfig(loader_workers=3), cuda_plan) == 3  # asked for: as asked
    monkeypatch.setattr(cpu_pool, "available_cpus", lambda: 1)
    assert inference.loader_threads(InferenceConfig(), cuda_plan) == 2
    with pytest.raises(ConfigError, match="--loader-workers must be >= 1"):
        InferenceConfig(loader_workers=0).validate()


def test_a_model_made_for_other_tiles_is_refused_as_score_refuses_it(tmp_path):
    """One model-vs-store check (score.scorer.check_model_matches_store): predict_store raises as score_store does."""
    store = _make_store(tmp_path / "s.zarr", _tiles(4, 48), chunk_tiles=4)
    with pytest.raises(ConfigError, match="tiles are 48 px but model standin expects 32 px tiles; re-tile with --tile-px 32"):
        predict_store(store, OrientedNet(_config(tile_px=32, input_px=32)), config=InferenceConfig(device="cpu"))
