"""Grad-CAM / Grad-CAM++: a model whose evidence is known must be explained by that evidence."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from wsi_her2.outputs.saliency import overlay_heatmap, paste_tile_heatmaps, save_overlay_png
from wsi_her2.train.explain import (
    _to_grid,
    gradcam,
    resolve_layer,
    save_stage_row_png,
    stage_cams,
    stage_layers,
)

BLOB = (slice(20, 30), slice(34, 44))


class BrownDetector(nn.Module):
    """Channel 0 = brownness (R - B), channel 1 = blueness (B - R); logits = pooled channels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1, bias=False)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([[1.0, 0, -1], [-1, 0, 1]]).view(2, 3, 1, 1))
            self.fc.weight.copy_(torch.eye(2))

    def forward(self, x):
        return self.fc(self.pool(self.act(self.conv(x))).flatten(1))


def _blob_tile() -> torch.Tensor:
    img = np.empty((48, 48, 3), np.float32)
    img[:] = (80, 80, 200)  # haematoxylin-blue background
    img[BLOB] = (160, 90, 40)  # a DAB-brown blob
    return torch.from_numpy(img / 255.0).permute(2, 0, 1)[None]


@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
def test_cam_highlights_the_planted_blob(method):
    model = BrownDetector()
    x = _blob_tile().repeat(2, 1, 1, 1)
    x[1] = torch.flip(x[1], dims=(-1,))  # the second sample has the blob mirrored
    heat = gradcam(model, x, method=method, layer="auto", target=0)
    assert heat.shape == (2, 48, 48) and float(heat.min()) >= 0 and float(heat.max()) <= 1
    inside = heat[0][BLOB].mean()
    outside = heat[0].sum() - heat[0][BLOB].sum()
    outside = outside / (48 * 48 - 100)
    assert inside > 0.9 and outside < 0.1 * inside
    torch.testing.assert_close(heat[1], torch.flip(heat[0], dims=(-1,)))  # batched, per-sample maps
    # without a target the predicted class is explained: blue, which covers more of the tile
    pred = model(x).argmax(1)
    assert (pred == 1).all()
    blue = gradcam(model, x, method=method)  # explains "blue": everything but the blob
    assert blue[0][BLOB].mean() < 0.1 and blue[0][:10, :10].mean() > 0.9


def test_auto_layer_by_tracing_and_by_name():
    model = BrownDetector()
    name, mod = resolve_layer(model, "auto", x=_blob_tile())
    assert name == "act" and mod is model.act
    assert resolve_layer(model, "conv")[1] is model.conv
    with pytest.raises(Exception, match="no layer"):
        resolve_layer(model, "layer9")


def test_registry_cnn_layers_and_stage_view(tmp_path):
    models = pytest.importorskip("wsi_her2.models")
    model = models.create_model("resnet18", input_px=64).eval()
    name, _ = resolve_layer(model, "auto")
    assert name == "layer4"
    names = [n for n, _ in stage_layers(model)]
    assert names == ["act1", "layer1", "layer2", "layer3", "layer4"]
    x = torch.randn(2, 3, 64, 64)
    cams = stage_cams(model, x, method="gradcam++")
    assert [n for n, _ in cams] == names and all(c.shape == (2, 64, 64) for _, c in cams)
    rgb = np.full((64, 64, 3), 200, np.uint8)
    p = save_stage_row_png(rgb, [(n, c[0].numpy()) for n, c in cams], tmp_path / "row.png", title="t")
    assert p.read_bytes()[:4] == b"\x89PNG"
    assert save_overlay_png(rgb, cams[-1][1][0].numpy(), tmp_path / "o.png").stat().st_size > 100


def test_vit_tokens_are_reshaped_without_the_class_token():
    timm = pytest.importorskip("timm")
    tokens = torch.arange(2 * 17 * 3, dtype=torch.float32).view(2, 17, 3)
    grid = _to_grid(tokens)
    assert grid.shape == (2, 3, 4, 4)
    torch.testing.assert_close(grid[0, :, 0, 0], tokens[0, 1])  # token 0 (class) dropped
    vit = timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=3).eval()
    name, _ = resolve_layer(vit, "auto")
    assert name == "blocks.11.norm1"
    heat = gradcam(vit, torch.randn(1, 3, 64, 64))
    assert heat.shape == (1, 64, 64) and float(heat.max()) == pytest.approx(1.0)


def test_overlay_and_slide_canvas():
    rgb = np.zeros((8, 8, 3), np.uint8)
    heat = np.zeros((4, 4), np.float32)
    heat[0, 0] = 1.0
    out = overlay_heatmap(rgb, heat, alpha=0.5)
    assert out.shape == (8, 8, 3) and out[0, 0, 0] > out[7, 7, 0] and out[7, 7, 2] > out[0, 0, 2]  # jet: hot red, cold blue
    maps = np.stack([np.full((4, 4), 0.25, np.float32), np.full((4, 4), 0.75, np.float32)])
    canvas = paste_tile_heatmaps(maps, [(0, 0), (16, 8)], tile_px=16, canvas_hw_px=(32, 48), downsample=4)
    assert canvas.shape == (8, 12)
    assert np.allclose(canvas[0:4, 0:4], 0.25) and np.allclose(canvas[2:6, 4:8], 0.75)
    assert np.isnan(canvas[7, 11]) and np.isnan(canvas[0, 8])
