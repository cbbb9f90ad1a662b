"""Realistic inputs for ONNX models shipped in PyPI packages (see inputs.py)."""
