"""A worker of ``qinject.executor``: runs serialised ONNX models on fixed inputs.

Started as a plain script (``python eval_worker.py``), so it imports only numpy and onnxruntime,
starts fast, and never re-imports the user's main module (as multiprocessing's spawn would) or
inherits JAX's threads (as fork would). Protocol on stdin/stdout, pickled: first the inputs (a dict
of arrays), then one serialised model per request; each is answered by ``("ok", output)`` or
``("error", message)``. EOF on stdin ends the worker. ``Worker`` is the same loop as an object, the
body of a Ray actor (``qinject.runtime.ray_executor`` ships this module to the cluster by value, so
a node needs numpy, onnxruntime and Ray, not qinject).
"""

from __future__ import annotations

import os
import pickle
import sys

import numpy as np
import onnxruntime as ort

CHUNK = 256  # the batch a graph with a symbolic batch dimension runs in (bounds memory, not results)


def run_model(blob: bytes, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """The model's first output over all samples, in fixed-size batches (a fixed batch dimension
    gets its size, the last batch padded by repeating its last sample)."""

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # one thread per model: deterministic, and the pool uses the cores
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return run_session(ort.InferenceSession(blob, options, providers=["CPUExecutionProvider"]), inputs)


def run_session(sess: object, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """A session's first output over all samples, batched as ``run_model`` describes."""
    specs = sess.get_inputs()
    # a 0-d input (an If's mode) is one value for every sample
    n = next((len(a) for a in inputs.values() if np.ndim(a)), 1)
    fixed = specs[0].shape[0] if specs and isinstance(specs[0].shape[0], int) else None
    step = fixed or CHUNK
    outs = []
    for start in range(0, n, step):
        if fixed:
            idx = np.minimum(np.arange(start, start + step), n - 1)
        else:
            idx = np.arange(start, min(start + step, n))
        feeds = {s.name: inputs[s.name][idx] if np.ndim(inputs[s.name]) else inputs[s.name] for s in specs}
        outs.append(sess.run(None, feeds)[0][: min(step, n - start)])
    return np.concatenate(outs)


def evaluate(blob: bytes, inputs: dict[str, np.ndarray]) -> tuple[str, object]:
    """``("ok", first output)``, or ``("error", one line)`` when onnxruntime refuses or fails the model
    (a model's fault: reported, never retried)."""
    try:
        return "ok", run_model(blob, inputs)
    except Exception as exc:  # noqa: BLE001  (reported to the parent as one line)
        return "error", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


class Worker:
    """One long-lived evaluator: the inputs once, then any number of serialised models."""

    failure = "onnxruntime could not run a model variant"  # what an ("error", message) reply means

    def __init__(self, inputs: dict[str, np.ndarray] | None = None) -> None:
        self.inputs, self.source = inputs, None

    def run(self, index: int, blob: bytes, stored: list | None = None) -> tuple[int, str, object]:
        """``(index, status, payload)``: ``evaluate``'s reply, tagged with the caller's index. A Ray
        actor serves every executor of its driver in turn: it reads the inputs of the task's executor
        (``stored``: ``[ObjectRef]``) from the object store when it does not hold them (new, restarted,
        or last used by another executor). Passed to the constructor instead, they would tie the actor
        to one executor, and Ray warns that a restart needs them."""
        if stored is not None and stored[0] != self.source:
            import ray  # deferred: only a Ray actor gets here, and a Ray worker has imported ray already

            self.inputs, self.source = ray.get(stored[0]), stored[0]
        return (index, *evaluate(blob, self.inputs))

    def forget(self) -> None:
        """Drop the inputs (their executor closed), so the object store can free them."""
        self.inputs = self.source = None

    def pid(self) -> int:
        return os.getpid()


def main() -> None:
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing but the protocol on stdout
    inputs = pickle.load(stdin)
    while True:
        try:
            blob = pickle.load(stdin)
        except EOFError:
            return
        pickle.dump(evaluate(blob, inputs), stdout, protocol=pickle.HIGHEST_PROTOCOL)
        stdout.flush()


if __name__ == "__main__":
    main()
