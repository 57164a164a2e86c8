"""The tile stage: tissue mask, tile geometry at a physical resolution, pixels, per-tile QC, QC picture, and the parallel resumable pipeline."""
