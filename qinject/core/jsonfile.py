"""Reading the JSON files users hand to qinject (plans, latency tables), with one-line errors."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from qinject.core.errors import QinjectError


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


def write_json(path: str | os.PathLike, data: object) -> Path:
    """Write ``data`` as indented JSON, atomically (a temporary file renamed into place)."""

    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=False, default=_plain)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _plain(value: object) -> object:

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot write a {type(value).__name__} as JSON")
