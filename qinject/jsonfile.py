"""Reading the JSON files users hand to qinject (plans, latency tables), with one-line errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

from qinject.errors import QinjectError


def read_json(path: str | os.PathLike, label: str, error: type[QinjectError]) -> object:
    """The parsed contents of ``path``; ``error`` with one line naming ``label`` and the problem."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise error(f"cannot read {label} {str(path)!r}: {exc.strerror or exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{label} {str(path)!r} is not valid JSON: {exc.msg} at line {exc.lineno} "
                    f"column {exc.colno}") from None
