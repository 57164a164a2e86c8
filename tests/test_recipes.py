"""Recipes: overrides, phase plans, freezing, and a few training steps of each preset on CPU."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from wsi_her2.errors import ConfigError
from wsi_her2.train.recipes import RECIPES, get_recipe, parse_overrides

models = pytest.importorskip("wsi_her2.models")
from wsi_her2.train.data import TileDataset, synthetic_ihc_tiles  # noqa: E402
from wsi_her2.train.trainer import apply_trainable, fit, partition_parameters  # noqa: E402

INPUT_PX = 32


def test_overrides_are_typed_and_checked():
    r = get_recipe("phased", parse_overrides(["epochs=3", "lr=1e-3", "phase_epochs=1,1,1", "amp=false",
                                              "grad_clip_norm=none", "split=0.6,0.2,0.2"]))
    assert (r.epochs, r.lr, r.phase_epochs, r.amp, r.grad_clip_norm, r.split) == \
        (3, 1e-3, (1, 1, 1), False, None, (0.6, 0.2, 0.2))
    assert RECIPES["phased"].epochs == 30  # presets are not mutated
    with pytest.raises(ConfigError, match="no field 'learning_rate'"):
        get_recipe("phased", {"learning_rate": "1"})
    with pytest.raises(ConfigError, match="optimizer"):
        get_recipe("all-trainable", {"optimizer": "lion"})
    with pytest.raises(ConfigError, match="unknown recipe"):
        get_recipe("bogus")


def test_phase_plan_keeps_published_proportions():
    r = RECIPES["phased"]
    assert [p.epochs for p in r.phases()] == [7, 10, 13]
    assert [p.trainable for p in r.phases()] == ["head", "last", "all"]
    small = get_recipe("phased", {"epochs": "3"})
    assert [p.epochs for p in small.phases()] == [1, 1, 1]
    assert sum(p.epochs for p in get_recipe("phased", {"epochs": "15"}).phases()) == 15
    assert len(RECIPES["all-trainable"].phases()) == 1


def test_paper_values_are_visible():
    a = RECIPES["all-trainable"]
    assert (a.head, a.optimizer, a.lr, a.epochs, a.step_epochs, a.step_gamma, a.batch_size) == \
        ("mlp512_256", "adam", 1e-4, 30, 15, 0.1, 16)
    p = RECIPES["phased"]
    assert (p.optimizer, p.label_smoothing, p.class_weights, p.weighted_sampler, p.grad_clip_norm, p.split,
            p.schedule, p.monitor) == ("adamw", 0.2, "balanced", True, 1.0, (0.7, 0.15, 0.15), "plateau", "val_auc")
    assert RECIPES["selective-freeze"].freeze_fraction == 0.5 and RECIPES["selective-freeze"].schedule == "cyclic"
    assert RECIPES["frozen-fusion"].trainable == "head"


def test_partition_of_the_vit_hybrid_unfreezes_last_blocks():
    with torch.device("meta"):
        model = models.create_model("hybrid_effv2s_vitb16")
    part = partition_parameters(model)
    assert len(part.backbones) == 2 and sum(b.is_vit for b in part.backbones) == 1
    r = RECIPES["phased"]
    phases = r.phases()
    on = apply_trainable(model, part, phases[1], r)
    vit = next(b for b in part.backbones if b.is_vit)
    vit_on = {n for n in on["backbone"] if n.startswith(vit.prefix)}
    blocks = {n.split(".blocks.")[1].split(".")[0] for n in vit_on if ".blocks." in n}
    assert blocks == {"8", "9", "10", "11"}
    head = apply_trainable(model, part, phases[0], r)
    assert head["backbone"] == [] and all(not p.requires_grad for n, p in model.named_parameters() if n not in part.head)


def test_selective_freeze_freezes_the_input_side_fraction():
    model = models.create_model("resnet18", input_px=INPUT_PX)
    part = partition_parameters(model)
    r = get_recipe("selective-freeze", {"freeze_fraction": "0.5"})
    apply_trainable(model, part, r.phases()[0], r)
    assert not model.conv1.weight.requires_grad and not model.layer1[0].conv1.weight.requires_grad
    assert model.layer4[1].conv2.weight.requires_grad and model.get_classifier().weight.requires_grad
    layers = part.backbones[0].layers
    frozen = sum(not dict(model.named_parameters())[layer[0]].requires_grad for layer in layers)
    assert frozen == len(layers) // 2


@pytest.fixture(scope="module")
def tiles():
    images, labels, _ = synthetic_ihc_tiles(8, tile_px=64, n_groups=2, seed=0)
    return images, labels


def _loss_on(model, ds):
    model.eval()
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    y = torch.as_tensor(ds.labels)
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(model(x), y))


CASES = {
    "all-trainable": ("resnet18", {"lr": "1e-3", "shift_frac": "0.05"}),
    "phased": ("hybrid_resnet18_effb0", {"phase_lr": "3e-3,1e-3,1e-3", "phase_backbone_lr": "0,1e-3,1e-3",
                                         "label_smoothing": "0.2", "last_stages": "1"}),
    "frozen-fusion": ("hybrid_resnet18_effb0", {"lr": "3e-3"}),
    "selective-freeze": ("resnet18", {"cyclic_base_lr": "1e-4", "cyclic_max_lr": "3e-3"}),
}


@pytest.mark.parametrize("recipe_name", list(CASES))
def test_each_recipe_trains_and_loss_falls(recipe_name, tiles, tmp_path):
    torch.manual_seed(0)
    model_name, extra = CASES[recipe_name]
    over = {"epochs": "3", "batch_size": "8", "steps_per_epoch": "4", "cache_images": "true", "seed": "0",
            "early_stopping_patience": "0", **extra}
    recipe = get_recipe(recipe_name, over)
    model = models.create_model(model_name, input_px=INPUT_PX, head=recipe.head or
                                models.get_config(model_name).head)
    cfg = model.wsi_her2_config
    images, labels = tiles
    kw = dict(input_px=INPUT_PX, mean=cfg.mean, std=cfg.std, cache=True)
    train = TileDataset(list(images), labels, **kw)
    before = _loss_on(model, train)
    result = fit(model, TileDataset(list(images), labels, **kw), TileDataset(list(images[::2]), labels[::2], **kw),
                 recipe, n_classes=4, device="cpu")
    after = _loss_on(model, train)
    assert result.steps == 12
    assert [h["phase"] for h in result.history] == [p.name for p in recipe.phases() for _ in range(p.epochs)]
    assert after < before, (before, after)
    assert result.images_per_s > 0

    path = models.save_model(model, tmp_path / "model.safetensors")
    again = models.load_model(path)
    x = torch.stack([train[i][0] for i in range(4)])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), rtol=1e-5, atol=1e-5)  # same weights; float kernels may differ in the last bits
    assert again.wsi_her2_config == cfg


def test_frozen_fusion_leaves_backbones_untouched(tiles):
    recipe = get_recipe("frozen-fusion", {"epochs": "1", "batch_size": "8", "steps_per_epoch": "2", "lr": "1e-3"})
    model = models.create_model("hybrid_resnet18_effb0", input_px=INPUT_PX)
    part = partition_parameters(model)
    backbone = part.backbone_names()
    before = {n: t.clone() for n, t in model.state_dict().items()}
    images, labels = tiles
    cfg = model.wsi_her2_config
    ds = TileDataset(list(images), labels, input_px=INPUT_PX, mean=cfg.mean, std=cfg.std)
    fit(model, ds, None, recipe, n_classes=4, device="cpu")
    after = model.state_dict()
    assert all(torch.equal(before[n], after[n]) for n in backbone)
    # BatchNorm running statistics of the frozen backbones did not drift either
    assert all(torch.equal(before[n], after[n]) for n in before if "running_mean" in n)
    assert any(not torch.equal(before[n], after[n]) for n in part.head)


def test_recipe_dataclass_round_trips():
    r = RECIPES["phased"]
    assert dataclasses.replace(r).to_dict() == r.to_dict()
    assert np.isclose(sum(r.split), 1.0)


def test_fit_puts_the_callers_random_state_back(tiles):
    recipe = get_recipe("all-trainable", {"epochs": "1", "batch_size": "8", "steps_per_epoch": "1", "seed": "3"})
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * INPUT_PX * INPUT_PX, 4))
    images, labels = tiles
    ds = TileDataset(list(images), labels, input_px=INPUT_PX, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    torch.manual_seed(123)
    state = torch.get_rng_state()
    fit(model, ds, None, recipe, n_classes=4, device="cpu")
    assert torch.equal(torch.get_rng_state(), state)  # the recipe's seed governed the run only
