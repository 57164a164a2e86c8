"""The zarr v3 patch store (the contract between tiling and scoring), its tile codecs and its integrity check: the only package importing zarr."""
