"""wsi-her2: whole-slide HER2 scoring with QuPath-checkable overlays."""
from __future__ import annotations

__version__ = "0.2.0"
