"""Passes about the target: profile it (``profile_target``), fit a plan to it (``fit_target``),
price a plan on it (``estimate_cost``)."""
