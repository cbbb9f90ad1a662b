"""Passes about the target: profile it (``profile_target``), fit a plan to it by its table
(``fit_target``) and by timing the rewrite here (``fit_measured``), price a plan on it (``estimate_cost``)."""
