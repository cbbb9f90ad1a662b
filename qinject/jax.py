"""``qinject.jax``, as the README shows it: the same module as ``qinject.app.jax``."""

from __future__ import annotations

import sys

from qinject.app import jax as _module

sys.modules[__name__] = _module
