"""What a scorer can do, declared where it is registered: generic code asks these, never the class or the name.

Why declared fields, and not a :class:`typing.Protocol` or fields of :class:`~wsi_her2.models.config.ModelConfig`:
a protocol checks that methods exist (``hasattr`` by another name), while "needs DAB IHC" or "takes a lab
calibration" are promises, not methods; and a model config is stored in every weights file and every
``<id>.json``, while a capability belongs to the code that scores (a weights file cannot make a network
count cells). So each registry entry carries a :class:`Capabilities` (the default: a plain tile classifier),
every model built by the registry carries it as ``wsi_her2_capabilities`` beside its ``wsi_her2_config``,
and ``tests/test_models.py`` builds each registered scorer and checks that it holds what it declares.

Torch-free: the command line and the score stage read it without building a model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["PLAIN_CLASSIFIER", "Capabilities", "capabilities_of"]


@dataclass(frozen=True)
class Capabilities:
    """What a scorer does beyond turning tiles into class probabilities.

    Attributes
    ----------
    cell_evidence
        Reports per-cell evidence: tumour-cell percentages (the cell-level ASCO/CAP call), the scored
        tumour (cells, mm²) and the table of scored cells (``score --cells``).
    stain
        The stain it measures (:data:`wsi_her2.vocab.DAB_IHC`: a slide that is not DAB IHC is refused unless
        ``--force``); None: any stain its training saw.
    calibration
        Takes a lab calibration (``--calibration``): a DAB gain on its ``thresholds`` and the
        tumour-cell fraction cut.
    glass_colour
        Measures optical density against the slide's own glass colour (its ``glass_rgb``, set from the store).
    criteria
        Grades membrane patterns by the guideline in use (its ``criteria``, set from ``--criteria``).
    adapts_to_store
        Measures in micrometres: built at the store's µm/px and tile size, never refused for them.
    gradients
        A network whose gradients Grad-CAM can follow (``--explain``).
    cpu_kernel
        Scores on CPU with its own kernel threads, and chunk by chunk in worker processes
        (:mod:`wsi_her2.score.cpu_pool`), unless its ``kernel`` is ``"torch"``: torch's own CPU threads
        would only compete with it.
    tumour_models
        The ways it can weigh nuclei as tumour (its ``tumour_model``, set from ``--tumour-model``); empty: none.
    colour_subsampling
        Corrects its membrane reading for tiles whose colour is subsampled (its ``chroma_mpp_um``, set from
        the store's ``tiling.chroma_mpp_um``).
    """

    cell_evidence: bool = False
    stain: str | None = None
    calibration: bool = False
    glass_colour: bool = False
    criteria: bool = False
    adapts_to_store: bool = False
    gradients: bool = True
    cpu_kernel: bool = False
    tumour_models: tuple[str, ...] = ()
    colour_subsampling: bool = False


#: A trained network: tiles in, class probabilities out, nothing more.
PLAIN_CLASSIFIER = Capabilities()


def capabilities_of(model: Any) -> Capabilities:
    """What ``model`` declared (built by the registry); a model built elsewhere is a plain classifier."""
    return getattr(model, "wsi_her2_capabilities", None) or PLAIN_CLASSIFIER
