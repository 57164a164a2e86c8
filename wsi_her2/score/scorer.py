"""The scorer of a store: which model, set up for the slide, and whether it fits the store's tiles.

Generic code asks a model's :class:`~wsi_her2.models.capabilities.Capabilities`, never its class or its
name: a scorer that ``adapts_to_store`` is built at the store's µm/px and tile size and never refused for
them; one that reads ``glass_colour`` gets the slide's measured glass; one graded by ``criteria`` gets the
guideline's; one that takes a ``calibration`` gets the lab's; one that measures a ``stain`` refuses slides
of another. :func:`check_model_matches_store` is the one check that a model fits a store's tiles, made
where every scoring path passes: :func:`wsi_her2.score.inference.predict_store`.
"""
from __future__ import annotations

from typing import Any

from wsi_her2.criteria import Criteria
from wsi_her2.errors import ConfigError
from wsi_her2.models.capabilities import PLAIN_CLASSIFIER, Capabilities, capabilities_of
from wsi_her2.score.calibration import Calibration
from wsi_her2.stain.check import check_stain_for_model

__all__ = ["DEFAULT_MODEL", "MPP_MATCH_TOLERANCE", "check_model_matches_store", "load_scoring_model", "measured_glass_rgb",
           "prepare_scorer", "scorer_capabilities", "store_chroma_mpp_um"]

#: The scorer ``wsi-her2 score`` uses unless told otherwise: the rule-based DAB membrane scorer (no weights).
DEFAULT_MODEL = "ihc_dab"
#: Physical field of view must match what the model was trained on (tile px x µm/px): relative µm/px tolerance.
MPP_MATCH_TOLERANCE = 0.10


def scorer_capabilities(name_or_path: str) -> Capabilities:
    """What the model ``--model`` names can do, before it is built: a registered name, or a trained
    weights file (read for the name of the model it holds)."""
    from wsi_her2.models import get_capabilities
    from wsi_her2.models.checkpoint import is_weights_path, read_config
    from wsi_her2.models.registry import registered

    if not is_weights_path(name_or_path):
        return get_capabilities(name_or_path)
    config = read_config(name_or_path)
    return get_capabilities(config.name) if config is not None and registered(config.name) else PLAIN_CLASSIFIER


def load_scoring_model(model: str, *, weights: str | None = None, store_mpp_um: float | None = None,
                       store_tile_px: int | None = None) -> Any:
    """The classifier ``model`` names (or points to); a scorer that adapts to the store is built at the store's
    µm/px and tile size (it measures in micrometres: a tile resized to another size would be read at the wrong scale)."""
    from wsi_her2.models import create_model, get_capabilities, load_model
    from wsi_her2.models.checkpoint import is_weights_path

    if is_weights_path(model):
        return load_model(model)
    if weights is None and get_capabilities(model).adapts_to_store:
        overrides: dict[str, Any] = {"mpp_um": store_mpp_um} if store_mpp_um else {}
        if store_tile_px:
            overrides.update(tile_px=int(store_tile_px), input_px=int(store_tile_px))
        return create_model(model, **overrides)
    return load_model(model, weights=weights)


def check_model_matches_store(model_cfg: Any, store: Any, *, capabilities: Capabilities) -> None:
    """Refuse (one :class:`ConfigError` line) tiles whose physical size differs from the model's training tiles.

    A scorer that ``adapts_to_store`` measures in µm and is never refused; a store that does not record its
    µm/px (a hand-made one) is checked for its tile size only."""
    if capabilities.adapts_to_store:
        return
    tiling = (getattr(store, "attrs", None) or {}).get("tiling", {})
    mpp = tiling.get("effective_mpp_um") or tiling.get("target_mpp_um")
    name = store.path.name if getattr(store, "path", None) is not None else "the store"
    if mpp and abs(float(mpp) - model_cfg.mpp_um) / model_cfg.mpp_um > MPP_MATCH_TOLERANCE:
        raise ConfigError(
            f"{name}: tiles are {float(mpp):.3f} µm/px but model {model_cfg.name} was trained at {model_cfg.mpp_um} µm/px; "
            f"re-tile with --mpp {model_cfg.mpp_um} --tile-px {model_cfg.tile_px}"
        )
    if int(store.tile_px) != int(model_cfg.tile_px):
        raise ConfigError(
            f"{name}: tiles are {store.tile_px} px but model {model_cfg.name} expects {model_cfg.tile_px} px tiles; "
            f"re-tile with --tile-px {model_cfg.tile_px} --mpp {model_cfg.mpp_um}"
        )


def prepare_scorer(store: Any, model: Any, *, criteria: Criteria, calibration: Calibration | None, force: bool,
                   tumour_model: str | None = None) -> Any:
    """``model`` set up for the slide of ``store`` (as its capabilities allow), after the check that it fits the
    store's stain (its tile size and µm/px are checked by ``predict_store``); returns it. ``tumour_model``:
    ``--tumour-model`` (None: the scorer's own)."""
    capabilities = capabilities_of(model)
    if capabilities.glass_colour and (glass := measured_glass_rgb(store)) is not None:
        model.glass_rgb = glass  # optical density measured against the slide's own glass colour
    if capabilities.criteria:
        model.criteria = criteria  # which membrane patterns make a cell 2+ and 3+
    if capabilities.colour_subsampling:
        model.chroma_mpp_um = store_chroma_mpp_um(store)  # a membrane's colour lost to a 4:2:0 level, scaled back
    if tumour_model is not None:
        if tumour_model not in capabilities.tumour_models:
            raise ConfigError(f"--tumour-model {tumour_model}: this model weighs no nuclei as tumour "
                              f"(choices: {', '.join(capabilities.tumour_models) or 'none'}); drop the option")
        model.tumour_model = tumour_model
    if calibration is not None:
        calibration.apply_to(model)
    check_stain_for_model(store, capabilities.stain, force=force)  # H&E given to a DAB scorer is refused
    return model


def store_chroma_mpp_um(store: Any) -> float | None:
    """Width in µm of one colour sample of the store's tiles (``tiling.chroma_mpp_um``); None for stores
    that predate it (their colour is then taken as sharp)."""
    chroma = store.attrs.get("tiling", {}).get("chroma_mpp_um")
    return None if chroma is None else float(chroma)


def measured_glass_rgb(store: Any) -> tuple[float, float, float] | None:
    """The glass colour the tile stage measured on the slide's glass, or None (no glass in view,
    or a store written before the tile stage recorded it)."""
    tissue = store.attrs.get("tissue", {})
    if not tissue.get("glass_measured"):
        return None
    return tuple(float(v) for v in tissue["glass_rgb"])
