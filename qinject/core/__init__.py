"""The core layer: the IR and its op facts, numerics and statistics, plans and rules, errors, calibration
data, the pass base class and pass manager. It imports nothing else from qinject."""
