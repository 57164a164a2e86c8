"""Tests of the patch-classifier registry and of safe weight files (CPU, tiny inputs)."""
from __future__ import annotations

import importlib.util
import json
import pickle
import socket
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from wsi_her2.cli import main as cli_main  # noqa: E402
from wsi_her2.errors import ConfigError, ModelNotFoundError, WeightsError  # noqa: E402
from wsi_her2.models import (  # noqa: E402
    HER2_CLASSES,
    FeatureClassifier,
    ModelConfig,
    create_model,
    get_config,
    gradcam_layer,
    list_models,
    load_model,
    parameter_groups,
    read_config,
    save_model,
)

HAVE_IHC_SCORER = importlib.util.find_spec("wsi_her2.models.ihc_score") is not None
# Architectures the brief requires; the registry may hold more, and every entry is round-tripped.
REQUIRED = {
    "convnext_tiny", "resnet50", "resnet18", "efficientnet_b0", "mobilenetv2_100", "inception_v3",
    "tf_efficientnetv2_s", "vit_base_patch16_224", "hybrid_resnet18_effb0", "hybrid_effv2s_vitb16",
    "resnet50_se_dsc", "ihc_dab",
}


@pytest.fixture(autouse=True)
def _few_threads():
    # One thread: on a shared, busy CPU, extra OpenMP threads spin-wait and run ~10x slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny_px(name: str) -> int:
    # InceptionV3 needs >= 75 px; everything else runs at 64 px.
    return 96 if get_config(name).arch == "inception_v3" else 64


def _batch(config: ModelConfig, px: int, *, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    rgb = torch.rand(2, 3, px, px, generator=gen)
    mean = torch.tensor(config.mean).view(1, 3, 1, 1)
    std = torch.tensor(config.std).view(1, 3, 1, 1)
    return (rgb - mean) / std


def test_registry_holds_every_required_architecture():
    assert REQUIRED <= set(list_models())
    for name in list_models():
        config = get_config(name)
        assert config.name == name
        assert config.classes == HER2_CLASSES
    assert get_config("inception_v3").input_px == 299
    assert get_config("ihc_dab").needs_weights is False
    assert get_config("ihc_dab").mean == (0.0, 0.0, 0.0) and get_config("ihc_dab").std == (1.0, 1.0, 1.0)


def test_get_config_returns_a_copy():
    config = get_config("resnet18")
    config.extra["tampered"] = True
    config.tile_px = 1
    assert "tampered" not in get_config("resnet18").extra
    assert get_config("resnet18").tile_px == 224


@pytest.mark.parametrize("name", sorted(set(list_models()) | REQUIRED))
def test_round_trip_every_architecture(name, tmp_path):
    if name == "ihc_dab" and not HAVE_IHC_SCORER:
        pytest.skip("wsi_her2.models.ihc_score is not written yet")
    px = _tiny_px(name)
    torch.manual_seed(0)
    model = create_model(name, input_px=px).eval()
    config = model.wsi_her2_config
    assert config.input_px == px

    x = torch.rand(2, 3, px, px) if name == "ihc_dab" else _batch(config, px)
    with torch.no_grad():
        expected = model(x)
    assert expected.shape == (2, len(HER2_CLASSES))
    assert torch.isfinite(expected).all()

    path = save_model(model, tmp_path / "model.safetensors")
    assert path == tmp_path / "model.safetensors" and path.is_file()
    sidecar = json.loads((tmp_path / "model.json").read_text())
    assert ModelConfig.from_dict(sidecar) == config

    loaded = load_model(path)
    assert not loaded.training
    assert loaded.wsi_her2_config == config
    assert not any(p.is_meta for p in loaded.parameters())
    seen = []
    learned = config.head != "none"
    if learned:
        handle = gradcam_layer(loaded).register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.no_grad():
        got = loaded(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)

    groups = parameter_groups(loaded)
    assert len(groups["backbone"]) + len(groups["head"]) == len(list(loaded.parameters()))
    if learned:
        handle.remove()
        assert groups["head"], "a learned head must be found for freezing the backbone"
        assert seen and len(seen[0]) in (3, 4)  # (B, C, h, w) for CNNs, tokens for a ViT
    if config.arch == "vit_base_patch16_224":  # input_px reached timm as img_size
        assert loaded.pos_embed.shape[1] == 1 + (px // 16) ** 2


def test_loading_really_replaces_the_random_weights(tmp_path):
    torch.manual_seed(0)
    trained = create_model("resnet18", input_px=64).eval()
    path = save_model(trained, tmp_path / "r18.safetensors")
    torch.manual_seed(1)
    fresh = create_model("resnet18", input_px=64).eval()
    x = _batch(trained.wsi_her2_config, 64)
    with torch.no_grad():
        assert not torch.allclose(fresh(x), trained(x))  # otherwise the round trip proves nothing
        torch.testing.assert_close(load_model("resnet18", weights=path)(x), trained(x), rtol=0, atol=1e-6)


def test_config_survives_round_trip_with_custom_head_and_stain_norm(tmp_path):
    stain_norm = {"method": "reinhard", "target_means": [180.8, 148.6, 116.5], "target_stds": [35.4, 17.5, 11.1]}
    model = create_model(
        "resnet18", input_px=64, tile_px=256, mpp_um=0.25, head="mlp512_256", dropout=0.3,
        classes=("neg", "low", "high"), stain_norm=stain_norm, extra={"trained_on": "synthetic"},
    ).eval()
    assert isinstance(model, FeatureClassifier)
    path = save_model(model, tmp_path / "custom")  # suffix added
    assert path.name == "custom.safetensors"

    stored = read_config(path)
    assert stored == model.wsi_her2_config
    loaded = load_model(path)
    cfg = loaded.wsi_her2_config
    assert (cfg.head, cfg.tile_px, cfg.input_px, cfg.mpp_um, cfg.dropout) == ("mlp512_256", 256, 64, 0.25, 0.3)
    assert cfg.classes == ("neg", "low", "high") and cfg.stain_norm == stain_norm
    assert cfg.extra == {"trained_on": "synthetic"}
    with torch.no_grad():
        assert loaded(_batch(cfg, 64)).shape == (2, 3)
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_torch_checkpoint_with_state_dict_and_config_loads(tmp_path):
    model = create_model("resnet18", input_px=64, classes=("a", "b")).eval()
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": model.state_dict(), "config": model.wsi_her2_config.to_dict(), "epoch": 3}, path)
    loaded = load_model(path)
    assert loaded.wsi_her2_config.classes == ("a", "b")
    x = _batch(loaded.wsi_her2_config, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=1e-6)

    four_class = create_model("resnet18", input_px=64).eval()
    raw = tmp_path / "raw.pth"  # a bare state_dict saved through DataParallel
    torch.save({f"module.{k}": v for k, v in four_class.state_dict().items()}, raw)
    again = load_model("resnet18", weights=raw)  # no config in the file: the registry's defaults
    assert again.wsi_her2_config.classes == HER2_CLASSES
    with torch.no_grad():
        torch.testing.assert_close(again(x), four_class(x), rtol=0, atol=1e-6)


class _Payload:
    """Unpickling this creates ``marker``: proof that a checkpoint ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    # The payload is live: an unrestricted unpickle does create the marker.
    probe = tmp_path / "probe_marker"
    pickle.loads(pickle.dumps(_Payload(probe))).close()
    assert probe.exists()

    marker = tmp_path / "pwned"
    state = create_model("resnet18").state_dict()
    zip_ckpt = tmp_path / "evil.pt"
    torch.save({"state_dict": state, "extra": _Payload(marker)}, zip_ckpt)
    legacy_ckpt = tmp_path / "evil_legacy.pth"
    with open(legacy_ckpt, "wb") as fh:
        pickle.dump({"weights": _Payload(marker)}, fh)

    for attempt in (
        lambda: load_model("resnet18", weights=zip_ckpt),
        lambda: load_model(zip_ckpt),
        lambda: load_model("resnet18", weights=legacy_ckpt),
        lambda: create_model("resnet18", pretrained_file=zip_ckpt),  # timm's ImageNet loader too
    ):
        with pytest.raises(WeightsError, match="not a plain tensor checkpoint; refusing to unpickle it; convert it"):
            attempt()
        assert not marker.exists()


def test_missing_and_unreadable_weights(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        load_model("resnet18", weights=tmp_path / "nope.safetensors")
    with pytest.raises(WeightsError, match="does not exist"):
        load_model(tmp_path / "nope.safetensors")

    text = tmp_path / "notes.pt"
    text.write_text("these are not weights\n")
    with pytest.raises(WeightsError, match="not a model checkpoint"):
        load_model("resnet18", weights=text)

    broken = tmp_path / "broken.safetensors"  # a plausible header length, then garbage
    broken.write_bytes((40).to_bytes(8, "little") + b"{" + b"x" * 60)
    with pytest.raises(WeightsError, match="not a model checkpoint"):
        load_model("resnet18", weights=broken)

    not_sd = tmp_path / "list.pt"
    torch.save([torch.zeros(3)], not_sd)
    with pytest.raises(WeightsError, match="not a state_dict"):
        load_model("resnet18", weights=not_sd)


def test_mismatched_weights_name_the_offending_keys(tmp_path):
    r18 = create_model("resnet18")
    raw = tmp_path / "r18.pth"
    torch.save(r18.state_dict(), raw)
    with pytest.raises(WeightsError, match=r"do not fit model 'resnet50'.*(missing keys|shape mismatches)") as info:
        load_model("resnet50", weights=raw)
    assert "conv1.weight" in str(info.value)  # names actual keys

    two_class = tmp_path / "two.pth"
    torch.save(create_model("resnet18", classes=("neg", "pos")).state_dict(), two_class)
    with pytest.raises(WeightsError, match=r"fc\.weight: file \(2, 512\) vs model \(4, 512\)"):
        load_model("resnet18", weights=two_class)

    saved = save_model(r18, tmp_path / "r18.safetensors")
    with pytest.raises(WeightsError, match="saved for model 'resnet18'.*--model resnet18"):
        load_model("resnet50", weights=saved)


def test_weights_required_for_trained_models():
    with pytest.raises(WeightsError, match="resnet18 needs trained weights: pass --weights FILE"):
        load_model("resnet18")


def test_unknown_model_lists_close_matches(tmp_path):
    with pytest.raises(ModelNotFoundError, match="did you mean 'resnet50'") as info:
        create_model("resnet5O")
    assert isinstance(info.value, KeyError)
    with pytest.raises(ModelNotFoundError):
        load_model("convnext_tinny")
    with pytest.raises(ModelNotFoundError, match="convnext_tiny"):
        get_config("ConvNext_Tiny")


def test_bad_overrides_and_configs_are_config_errors():
    with pytest.raises(ConfigError, match="unknown setting"):
        create_model("resnet18", input_size=64)
    with pytest.raises(ConfigError, match="head"):
        create_model("resnet18", head="transformer")
    with pytest.raises(ConfigError, match="mean and std"):
        ModelConfig(name="x", arch="resnet18", mean=(0.5, 0.5))
    with pytest.raises(ConfigError, match="mpp_um"):
        ModelConfig(name="x", arch="resnet18", mpp_um=0)


def test_imagenet_weights_offline_only(tmp_path, monkeypatch):
    # An empty hub cache: timm must fail fast with a message that says what to do.
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty_hub_cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    connects = []  # the hub's ~47 s of retries start with a name lookup or a connection: there must be none
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: connects.append(host) or [])
    monkeypatch.setattr(socket.socket, "connect", lambda self, address: connects.append(address))
    with pytest.raises(WeightsError, match="ImageNet weights for resnet18 are not available offline: pass --pretrained-file"):
        create_model("resnet18", pretrained=True)
    assert connects == []

    with pytest.raises(WeightsError, match="does not exist"):
        create_model("resnet18", pretrained_file=tmp_path / "missing.safetensors")
    with pytest.raises(ConfigError, match="folder holding"):
        create_model("hybrid_resnet18_effb0", pretrained_file=tmp_path / "missing.safetensors")


def test_pretrained_file_initialises_the_backbone(tmp_path):
    from safetensors.torch import save_file

    # A stand-in ImageNet checkpoint: the same timm architecture with 1000 classes.
    imagenet = create_model("resnet18", classes=tuple(str(i) for i in range(1000)))
    folder = tmp_path / "imagenet"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in imagenet.state_dict().items()}, str(folder / "resnet18.safetensors"))

    model = create_model("resnet18", pretrained_file=folder / "resnet18.safetensors")
    torch.testing.assert_close(model.conv1.weight, imagenet.conv1.weight)
    assert model.fc.weight.shape == (4, 512)  # the classifier is new, sized for HER2

    mlp = create_model("resnet18", head="mlp512_256", pretrained_file=folder)  # folder with <arch>.safetensors
    torch.testing.assert_close(mlp.features.layer4[1].conv2.weight, imagenet.layer4[1].conv2.weight)


@pytest.mark.skipif(not HAVE_IHC_SCORER, reason="wsi_her2.models.ihc_score is not written yet")
def test_ihc_dab_loads_without_weights():
    model = load_model("ihc_dab")
    assert not model.training
    with torch.no_grad():
        logits = model(torch.rand(3, 3, 64, 64))
    assert logits.shape == (3, 4)


def test_cli_lists_every_model(capsys):
    assert cli_main(["models"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:2] == ["name", "arch"]
    listed = {line.split()[0] for line in lines[1:]}
    assert listed == set(list_models())
    inception = next(line for line in lines if line.startswith("inception_v3 "))
    assert " 299 " in inception and "needed" in inception

    assert cli_main(["models", "--json", "resnet18", "ihc_dab"]) == 0
    configs = json.loads(capsys.readouterr().out)
    assert [c["name"] for c in configs] == ["resnet18", "ihc_dab"]
    assert configs[1]["needs_weights"] is False

    assert cli_main(["models", "resnt18"]) == 2
    assert "did you mean 'resnet18'" in capsys.readouterr().err


def test_cli_inspect_prints_the_stored_config(tmp_path, capsys):
    path = save_model(create_model("efficientnet_b0", tile_px=512, mpp_um=0.25), tmp_path / "m.safetensors")
    assert cli_main(["models", "--inspect", str(path)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["name"] == "efficientnet_b0" and shown["tile_px"] == 512 and shown["mpp_um"] == 0.25


def test_the_registry_fills_itself_on_first_use_in_a_fresh_process():
    """``wsi_her2.models`` loads torch and its registry lazily; the first lookup still sees every model."""
    import subprocess
    import sys

    code = ("import sys, threading\n"
            "import wsi_her2.models.ihc_thresholds\n"
            "assert 'torch' not in sys.modules, 'a torch-free submodule imported torch'\n"
            "from wsi_her2.models.registry import get_config, list_models\n"
            "seen = []\n"
            "threads = [threading.Thread(target=lambda: seen.append(len(list_models()))) for _ in range(4)]\n"
            "[t.start() for t in threads]; [t.join() for t in threads]\n"
            "assert len(set(seen)) == 1 and 'ihc_dab' in list_models(), seen\n"
            "assert get_config('convnext_tiny').name == 'convnext_tiny'\n"
            "from wsi_her2.models import create_model\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok"


def test_every_registered_scorer_holds_what_its_capabilities_declare():
    """Generic code sets and calls these on the word of the capabilities alone (score/scorer.py, inference.py)."""
    from dataclasses import replace

    from wsi_her2.criteria import get_criteria
    from wsi_her2.models import capabilities_of, get_capabilities, list_models
    from wsi_her2.models.capabilities import PLAIN_CLASSIFIER

    declared = [name for name in list_models() if get_capabilities(name) != PLAIN_CLASSIFIER]
    assert "ihc_dab" in declared
    for name in declared:
        model = create_model(name, tile_px=64, input_px=64)
        caps = capabilities_of(model)
        assert caps == get_capabilities(name)
        if caps.glass_colour:
            model.glass_rgb = (240.0, 235.0, 220.0)
        if caps.criteria:
            model.criteria = get_criteria("gastric")
        if caps.calibration:
            model.thresholds = replace(model.thresholds, dab_gain=1.5)
        for tumour_model in caps.tumour_models:
            model.tumour_model = tumour_model
        if caps.colour_subsampling:
            model.chroma_mpp_um = 2.0
        if caps.cpu_kernel:
            assert model.kernel in ("auto", "opencv", "torch") and callable(model.measure_evidence)
        if caps.cell_evidence:
            out = model.measure(torch.rand(2, 3, 64, 64))
            assert {"tumour_cell_count", "cells"} <= set(out)
    assert capabilities_of(create_model("resnet18")) == PLAIN_CLASSIFIER
