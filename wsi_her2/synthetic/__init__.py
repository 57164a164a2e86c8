"""Synthetic slides with planted ground truth (IHC grades, blur, pen, TMA cores, pale cores on tinted glass) and the Aperio-like SVS writer."""
