"""The installed package: `passes/` is `qinject.passes`, never a top-level `passes` module."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_passes_live_under_the_qinject_namespace(tmp_path) -> None:
    code = ("import importlib.util, qinject.passes; "
            "print(importlib.util.find_spec('passes') is None, qinject.passes.InsertQDQ.name)")
    # Run outside the repository so its folder is not on sys.path.
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "insert-qdq"]


def test_console_script_is_installed() -> None:
    exe = Path(sys.executable).with_name("qinject")  # installed beside the interpreter by pip
    r = subprocess.run([exe, "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "quantize" in r.stdout and "inspect" in r.stdout and "demo" in r.stdout
