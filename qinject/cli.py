"""``qinject.cli``, as the README shows it: the same module as ``qinject.app.cli`` (``python -m
qinject.cli`` runs the command line)."""

from __future__ import annotations

import sys

from qinject.app import cli as _module

if __name__ == "__main__":
    _module.main()
else:
    sys.modules[__name__] = _module
