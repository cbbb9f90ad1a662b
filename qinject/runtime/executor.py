"""Every model evaluation of an analysis or a search goes through one ``Executor``, which counts them.

An evaluation runs a *variant* of the calibrated float model (the model quantized by a plan, or
with one weight perturbed) on the evaluation inputs and returns its first output. Variants are
serialised to ONNX (a JAX-sourced graph is lowered first) and run by onnxruntime, one thread each,
in a local process pool (``workers`` processes, default: every core), so a batch of variants uses
both cores of this machine. Results do not depend on the number of workers or on which worker ran
a variant: each variant runs whole in one single-threaded session. The workers are plain scripts
(``qinject/runtime/eval_worker.py``) fed through pipes, not ``multiprocessing`` processes: spawn would
re-import the caller's main module (scripts without a ``__main__`` guard would recurse) and fork is
unsafe after JAX has started its threads. With ``executor="ray"`` (a local Ray) or
``"ray://HOST:PORT"`` (a cluster) the variants run on Ray actors instead
(``qinject/runtime/ray_executor.py``), with the same outputs bit for bit.

A variant differs from the float model in one node's weight codes and a few Q/DQ constants, so only that
travels: the float model's large initializers (over 1 KiB, numpy types) go to the workers once, when
the pool starts, written to one temporary raw file that every worker maps read-only (the pages are
shared, not copied per worker; the file is deleted once mapped). Each variant is serialised
weightless (``qinject.ir.weightless(shared=...)``): an initializer whose tensor is the float model's
very tensor (``quantized`` and ``with_weight`` clone the model, and a clone shares its tensors) is
a stub, and the worker hands the mapped array to onnxruntime as an external initializer; anything
else (a changed weight, new scales and zero points, a tensor a JAX lowering made anew) is embedded
as before. A BERT-base variant is then a few MB instead of 440. In this process (``workers=1``, or
a single variant) the float model's arrays are used in place; on Ray they go into the object store
once.

Typical use::

    with Executor(calibrated_model, inputs) as ex:
        reference = ex.reference()                     # the float model's outputs
        outs = ex.run([ex.quantized(plan_a), ex.quantized(plan_b)])
        print(ex.count)                                # 3 model evaluations
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pickle
import queue
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import onnx_ir as ir
from tqdm.auto import tqdm

from qinject.backends import onnx_backend
from qinject.core import ir as qir
from qinject.core.errors import QinjectError
from qinject.core.plan import Plan
from qinject.passes.transforms.insert_qdq import InsertQDQ
from qinject.passes.transforms.lower_jax_to_onnx import LowerJaxToOnnx
from qinject.runtime import eval_worker, ray_executor


class Executor:
    """Runs model variants on fixed inputs and counts the evaluations.

    Args:
        model: the calibrated float IR model (calibration statistics in ``meta``).
        inputs: the evaluation inputs, keyed by graph input name (first axis = samples).
        workers: processes in the pool (default: the machine's cores); 1 runs in this process. With
            Ray: actors (default: one per CPU of the cluster).
        method, percentile: how activation ranges are chosen when a plan is applied.
        executor: "process" (None: the local process pool), "ray" (a local Ray) or "ray://HOST:PORT".
        progress: one progress bar under this name for every evaluation this executor runs (the
            whole analysis or search), instead of one per ``run``.
    """

    def __init__(self, model: ir.Model, inputs: dict[str, np.ndarray], workers: int | None = None,
                 method: str = "minmax", percentile: float = 99.99, executor: str | None = None,
                 progress: str | None = None) -> None:
        self.model, self.inputs = model, {k: np.require(v, requirements="C") for k, v in inputs.items()}
        self.executor = ray_executor.check(executor)
        self.requested_workers = workers
        self.workers = max(1, workers if workers is not None else (os.cpu_count() or 1))
        self.method, self.percentile = method, percentile
        self.count = 0
        self._pool: _WorkerPool | ray_executor.RayPool | None = None
        self._progress = progress
        self._bar: Any = None
        self._reference: np.ndarray | None = None
        self._shared: dict[str, ir.TensorProtocol] | None = None
        self._arrays: dict[str, np.ndarray] | None = None
        missing = [v.name for v in model.graph.inputs if v.name not in self.inputs]
        if missing:
            raise QinjectError(f"evaluation data lacks model input(s) {missing} (it has {sorted(self.inputs)})")

    # -- variants -----------------------------------------------------------------------------------------
    def quantized(self, plan: Plan, weights: dict[str, np.ndarray] | None = None) -> ir.Model:
        """The model quantized by ``plan`` with its calibrated ranges (a copy; the model is untouched),
        initializers named in ``weights`` replaced first."""

        variant = self.model.clone()
        for name, array in (weights or {}).items():
            value = variant.graph.initializers[name]
            value.const_value = ir.tensor(np.ascontiguousarray(array), name=name)
        InsertQDQ(plan, method=self.method, percentile=self.percentile)(variant)
        return variant

    def with_weight(self, name: str, array: np.ndarray) -> ir.Model:
        """The float model with initializer ``name`` replaced by ``array`` (a copy)."""
        variant = self.model.clone()
        value = variant.graph.initializers[name]
        value.const_value = ir.tensor(np.ascontiguousarray(array, dtype=value.const_value.numpy().dtype), name=name)
        return variant

    # -- running ------------------------------------------------------------------------------------------
    def reference(self) -> np.ndarray:
        """The float model's outputs (evaluated once, then cached)."""
        if self._reference is None:
            (self._reference,) = self.run([self.model])
        return self._reference

    def run(self, variants: Iterable[ir.Model], progress: str | bool | None = None, total: int | None = None
            ) -> list[np.ndarray]:
        """Each variant's first output on the evaluation inputs, in order. Variants may be a lazy
        iterable (built while earlier ones run); ``progress`` names a progress bar."""
        if total is None and isinstance(variants, Sequence):
            total = len(variants)
        variants = iter(variants)
        outputs: list[np.ndarray] = []
        with self._progress_bar(progress, total) as bar:
            shared = self._shared_tensors()
            if ray_executor.is_ray(self.executor):
                if self._pool is None:
                    self._pool = ray_executor.RayPool(self.executor, self.requested_workers, self.inputs,
                                                      shared=self._shared_arrays())

                def done() -> None:  # counted as each result arrives: a retried evaluation counts once
                    self.count += 1
                    bar.update(1)

                return self._pool.map((_serialise(v, shared) for v in variants), done)
            while batch := [_serialise(v, shared) for v in itertools.islice(variants, 2 * self.workers)]:
                outputs.extend(self._run_jobs(batch))
                bar.update(len(batch))
        return outputs

    def _shared_tensors(self) -> dict[str, ir.TensorProtocol]:
        """The float model's initializers that workers hold once (see the module docstring)."""
        if self._shared is None:
            self._shared = qir.large_initializers(self.model, numpy_only=True)
        return self._shared

    def _shared_arrays(self) -> dict[str, np.ndarray]:
        """The shared tensors as C-contiguous arrays (the tensors' own memory where it is contiguous)."""
        if self._arrays is None:
            self._arrays = {name: np.ascontiguousarray(t.numpy()) for name, t in self._shared_tensors().items()}
        return self._arrays

    @contextlib.contextmanager
    def _progress_bar(self, progress: str | bool | None, total: int | None) -> Iterator[Any]:
        """This run's bar, or the executor's one bar (its total grows by each run's)."""
        if not self._progress:
            with tqdm(total=total, desc=progress or None, unit="eval", disable=None if progress else True,
                      leave=False) as bar:
                yield bar
            return
        if self._bar is None:
            self._bar = tqdm(total=total, desc=self._progress, unit="eval", disable=None, leave=False)
        elif self._bar.total is not None:  # unknown once any run's length is
            self._bar.total = None if total is None else self._bar.total + total
            self._bar.refresh()
        yield self._bar

    def _run_jobs(self, jobs: list[Job]) -> list[np.ndarray]:
        self.count += len(jobs)
        if self.workers == 1 or len(jobs) == 1:
            arrays = self._shared_arrays()
            return [eval_worker.run_model(blob, self.inputs, {n: arrays[n] for n in names}) for blob, names in jobs]
        if self._pool is None:
            self._pool = _WorkerPool(self.workers, self.inputs, self._shared_arrays())
        return self._pool.map(jobs)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# Runs the worker script without putting its folder (qinject/, whose inspect.py would shadow the
# standard library's) or the working directory on sys.path.
_LAUNCH = ("import runpy, sys; sys.path[:] = [p for p in sys.path if p not in ('', '.')]; "
           "runpy.run_path(sys.argv[1], run_name='__main__')")


class _WorkerPool:
    """``n`` worker processes; each request goes to whichever is free. ``shared``: the float model's
    weights, written once to a temporary file that the workers map (deleted once they have)."""

    def __init__(self, n: int, inputs: dict[str, np.ndarray], shared: dict[str, np.ndarray]) -> None:
        self.procs, self.threads = [], None
        fd, path = tempfile.mkstemp(prefix="qinject-weights-", suffix=".bin")
        os.close(fd)
        try:
            try:
                index = eval_worker.write_weights(shared, path)
            except OSError as exc:
                raise QinjectError(f"cannot write the float model's weights for the evaluation workers to {path} "
                                   f"({exc.strerror or exc}); free space there or point TMPDIR elsewhere") from None
            for _ in range(n):
                proc = subprocess.Popen([sys.executable, "-c", _LAUNCH, eval_worker.__file__],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
                self.procs.append(proc)
                pickle.dump(inputs, proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
                pickle.dump((path, index), proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
                proc.stdin.flush()
            for proc in self.procs:  # each has mapped the file: it may go
                pickle.load(proc.stdout)
        except (EOFError, BrokenPipeError) as exc:
            self.close()
            raise QinjectError(f"an evaluation worker died while starting ({type(exc).__name__})") from None
        finally:
            os.unlink(path)
        self.free: queue.Queue = queue.Queue()
        for proc in self.procs:
            self.free.put(proc)
        self.threads = ThreadPoolExecutor(n)

    def map(self, jobs: Sequence[Job]) -> list[np.ndarray]:
        return list(self.threads.map(self._call, jobs))

    def _call(self, job: Job) -> np.ndarray:
        proc = self.free.get()
        try:
            pickle.dump(job, proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            proc.stdin.flush()
            status, payload = pickle.load(proc.stdout)
        except (EOFError, BrokenPipeError) as exc:
            raise QinjectError(f"an evaluation worker died ({type(exc).__name__})") from None
        finally:
            self.free.put(proc)
        if status != "ok":
            raise QinjectError(f"onnxruntime could not run a model variant: {payload}")
        return payload

    def close(self) -> None:
        if self.threads is not None:  # None: a worker died while the pool started
            self.threads.shutdown()
        for proc in self.procs:
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.close()
            proc.wait(timeout=30)
            proc.stdout.close()


def as_onnx(model: ir.Model) -> ir.Model:
    """The model with only ONNX ops (a JAX-sourced graph is lowered on a clone)."""
    if qir.has_jax_nodes(model):

        return LowerJaxToOnnx()(model.clone()).model
    return model


def to_onnx_bytes(model: ir.Model) -> bytes:
    """The model as a self-contained ONNX file's bytes (jax nodes lowered, external data embedded)."""
    return _serialise(model, {})[0]


# A variant as it travels: its weightless ONNX bytes and the names of the shared weights it lacks.
Job = tuple[bytes, tuple[str, ...]]


def _serialise(model: ir.Model, shared: dict[str, ir.TensorProtocol]) -> Job:
    """The variant's ONNX bytes without the initializers that are ``shared``'s very tensors, and
    their names (a worker supplies them)."""
    model = as_onnx(model)
    with qir.weightless(model, shared=shared) as stubbed:
        # Worker sessions load from bytes, with no folder for external data to be found in: embed it.
        external = {name: v.const_value for name, v in model.graph.initializers.items()
                    if isinstance(v.const_value, ir.ExternalTensor) and name not in stubbed}
        try:
            for name, tensor in external.items():
                model.graph.initializers[name].const_value = ir.tensor(tensor.numpy(), name=name)
            return onnx_backend.to_proto(model).SerializeToString(), tuple(stubbed)
        finally:
            for name, tensor in external.items():
                model.graph.initializers[name].const_value = tensor
