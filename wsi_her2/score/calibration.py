"""A lab calibration of a scorer's cut-points: the file ``wsi-her2 calibrate`` writes, and how a scorer takes it.

The fit itself is :mod:`wsi_her2.score.calibrate`; ``score --calibration`` needs only this (no fitting).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from wsi_her2.errors import ConfigError
from wsi_her2.models.capabilities import capabilities_of

__all__ = ["CALIBRATION_SCHEMA", "Calibration", "load_calibration"]

CALIBRATION_SCHEMA = 1


@dataclass(frozen=True)
class Calibration:
    dab_gain: float = 1.0
    cell_fraction_cut: float = 0.10

    def __post_init__(self) -> None:
        if not (0.1 <= self.dab_gain <= 10.0) or not (0.0 < self.cell_fraction_cut < 1.0):
            raise ConfigError(
                f"calibration out of range (dab_gain {self.dab_gain}, cell_fraction_cut {self.cell_fraction_cut}); "
                "re-run wsi-her2 calibrate"
            )

    def apply_to(self, model: Any) -> None:
        """Set the scorer's DAB gain (a scorer that declares the ``calibration`` capability has ``thresholds``)."""
        if not capabilities_of(model).calibration:
            raise ConfigError("--calibration: this model takes no lab calibration (a trained model is calibrated by "
                              "training); score with a scorer that does, such as the default, or drop --calibration")
        model.thresholds = replace(model.thresholds, dab_gain=self.dab_gain)


def load_calibration(path: str | Path) -> tuple[Calibration, dict]:
    """``(Calibration, the whole file)`` from a ``wsi-her2 calibrate`` output; one-line errors."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        cal = Calibration(float(data["dab_gain"]), float(data["cell_fraction_cut"]))
    except FileNotFoundError:
        raise ConfigError(f"{path}: calibration file not found; make one with wsi-her2 calibrate") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a calibration file; give the JSON file wsi-her2 calibrate wrote") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the calibration file ({getattr(exc, 'strerror', None) or exc}); "
                          "give a readable file made by wsi-her2 calibrate") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: not a wsi-her2 calibration file ({exc}); make one with wsi-her2 calibrate") from None
    return cal, data
