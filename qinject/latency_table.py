"""``qinject.latency_table``, as the README shows it: the same module as ``qinject.cost.latency_table``."""

from __future__ import annotations

import sys

from qinject.cost import latency_table as _module

sys.modules[__name__] = _module
