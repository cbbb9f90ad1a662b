"""``qinject.plan``, as the README shows it: the same module as ``qinject.core.plan``."""

from __future__ import annotations

import sys

from qinject.core import plan as _module

sys.modules[__name__] = _module
