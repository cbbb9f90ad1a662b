"""The application layer: the Python API (``api``), the JAX decorator (``jax``), the accuracy/latency
``report``, ``plots``, the ``demo`` and the ``cli``."""
