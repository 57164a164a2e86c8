"""Stain physics shared by scoring and training: optical density and colour deconvolution, the IHC stain check, stain normalisation, test-time augmentation."""
