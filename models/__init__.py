"""The model zoo used by tests, the demo and benchmarks."""
