"""A worker of ``qinject.executor``: runs serialised ONNX models on fixed inputs.

Started as a plain script (``python eval_worker.py``), so it imports only numpy and onnxruntime,
starts fast, and never re-imports the user's main module (as multiprocessing's spawn would) or
inherits JAX's threads (as fork would). Protocol on stdin/stdout, pickled: first the inputs (a dict
of arrays), then the shared weights (``(path, index)`` of a file ``write_weights`` wrote, mapped
read-only so that every worker reads the same pages, or None), answered by ``("ok", None)`` once
mapped (the parent may then delete the file); then one job per request; each is answered by
``("ok", output)`` or ``("error", message)``. EOF on stdin ends the worker. A job is a serialised
model, or ``(serialised model, names)``: a weightless model (``qinject.ir.weightless``) whose
initializers ``names`` are the shared weights of those names, handed to onnxruntime as external
initializers instead of travelling with every variant. ``Worker`` is the same loop as an object,
the body of a Ray actor (``qinject.runtime.ray_executor`` ships this module to the cluster by value,
so a node needs numpy, onnxruntime and Ray, not qinject).
"""

from __future__ import annotations

import os
import pickle
import sys
from collections.abc import Mapping

import numpy as np
import onnxruntime as ort

CHUNK = 256  # the batch a graph with a symbolic batch dimension runs in (bounds memory, not results)


ALIGN = 64  # byte alignment of each array in a shared weights file


def run_model(blob: bytes, inputs: dict[str, np.ndarray], weights: Mapping[str, np.ndarray] | None = None
              ) -> np.ndarray:
    """The model's first output over all samples, in fixed-size batches (a fixed batch dimension
    gets its size, the last batch padded by repeating its last sample). ``weights`` supplies the
    stubbed initializers of a weightless model (read in place, never copied into the blob)."""

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # one thread per model: deterministic, and the pool uses the cores
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    # onnxruntime reads these buffers for the session's life (which ends with this call): keep them here
    values = [ort.OrtValue.ortvalue_from_numpy(a) for a in (weights or {}).values()]
    if values:
        options.add_external_initializers(list(weights), values)
    return run_session(ort.InferenceSession(blob, options, providers=["CPUExecutionProvider"]), inputs)


def write_weights(arrays: Mapping[str, np.ndarray], path: str) -> dict[str, tuple[str, tuple[int, ...], int]]:
    """Write C-contiguous ``arrays`` to one raw file; ``name -> (dtype, shape, offset)``, what
    ``map_weights`` needs to read them back."""
    index, offset = {}, 0
    with open(path, "wb") as f:
        for name, array in arrays.items():
            offset = -(-offset // ALIGN) * ALIGN
            f.seek(offset)
            f.write(memoryview(np.ascontiguousarray(array)).cast("B"))
            index[name] = (array.dtype.str, tuple(array.shape), offset)
            offset += array.nbytes
    return index


def map_weights(path: str, index: Mapping[str, tuple[str, tuple[int, ...], int]]) -> dict[str, np.ndarray]:
    """The arrays ``write_weights`` wrote, read-only views of the mapped file (no copy: processes
    mapping one file share its pages)."""
    if not index:
        return {}
    data = np.memmap(path, dtype=np.uint8, mode="r")
    arrays = {}
    for name, (dtype, shape, offset) in index.items():
        size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        arrays[name] = data[offset:offset + size].view(dtype).reshape(shape)
    return arrays


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


def evaluate(job: bytes | tuple[bytes, tuple[str, ...]], inputs: dict[str, np.ndarray],
             shared: Mapping[str, np.ndarray] | None = None) -> tuple[str, object]:
    """``("ok", first output)``, or ``("error", one line)`` when onnxruntime refuses or fails the model
    (a model's fault: reported, never retried). ``job``: a serialised model, or one and the names of
    the ``shared`` weights it lacks."""
    try:
        blob, names = (job, ()) if isinstance(job, bytes) else job
        return "ok", run_model(blob, inputs, {name: shared[name] for name in names} if names else None)
    except Exception as exc:  # noqa: BLE001  (reported to the parent as one line)
        return "error", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


class Worker:
    """One long-lived evaluator: the inputs (and shared weights) once, then any number of jobs."""

    failure = "onnxruntime could not run a model variant"  # what an ("error", message) reply means

    def __init__(self, inputs: dict[str, np.ndarray] | None = None,
                 shared: Mapping[str, np.ndarray] | None = None) -> None:
        self.inputs, self.shared, self.source = inputs, shared, None

    def run(self, index: int, job: bytes | tuple[bytes, tuple[str, ...]], stored: list | None = None
            ) -> tuple[int, str, object]:
        """``(index, status, payload)``: ``evaluate``'s reply, tagged with the caller's index. A Ray
        actor serves every executor of its driver in turn: it reads the inputs and shared weights of
        the task's executor (``stored``: ``[ObjectRef of inputs, ObjectRef of weights]``) from the
        object store when it does not hold them (new, restarted, or last used by another executor);
        the weights are read in place from the store's shared memory, not copied. Passed to the
        constructor instead, they would tie the actor to one executor, and Ray warns that a restart
        needs them."""
        if stored is not None and stored[0] != self.source:
            import ray  # deferred: only a Ray actor gets here, and a Ray worker has imported ray already

            self.inputs, *rest = ray.get(stored)
            self.shared, self.source = (rest or [None])[0], stored[0]
        return (index, *evaluate(job, self.inputs, self.shared))

    def forget(self) -> None:
        """Drop the inputs and weights (their executor closed), so the object store can free them."""
        self.inputs = self.shared = self.source = None

    def pid(self) -> int:
        return os.getpid()


def main() -> None:
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing but the protocol on stdout
    inputs = pickle.load(stdin)
    weights = pickle.load(stdin)
    shared = map_weights(*weights) if weights is not None else None
    pickle.dump(("ok", None), stdout, protocol=pickle.HIGHEST_PROTOCOL)
    stdout.flush()
    while True:
        try:
            job = pickle.load(stdin)
        except EOFError:
            return
        pickle.dump(evaluate(job, inputs, shared), stdout, protocol=pickle.HIGHEST_PROTOCOL)
        stdout.flush()


if __name__ == "__main__":
    main()
