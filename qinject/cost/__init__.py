"""The cost layer: latency tables (``latency_table``, the built-in JSON tables in ``targets/``) and the
latency estimate of a model under a plan (``estimate``). Below the passes; above core and the backends."""
