"""Frontends: lower a source model (ONNX file, JAX function) into the graph IR."""
