"""Rounding of low-bit weights on calibration data: AdaRound and bias correction."""
