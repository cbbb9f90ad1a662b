"""Backends: turn the IR into something that runs (an ONNX file for onnxruntime, a JAX callable)."""
