"""The runtime layer: running models and their variants (the counting ``executor`` and its worker
processes, ``evaluation`` metrics and budgets, ``measure``d latency, ``layer_data``) and the latency
``profiler``. It sits above the rewrite passes (a variant is the model through ``InsertQDQ``) and
below the analyses that evaluate variants."""
