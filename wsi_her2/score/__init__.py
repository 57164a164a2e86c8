"""The score stage: tile loader, batched inference, slide aggregation, calibration, regions and TMA cores, and the pipeline that writes every output."""
