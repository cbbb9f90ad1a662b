"""Evaluations on a Ray cluster: the ``Executor``'s pool when ``executor="ray"`` or ``"ray://HOST:PORT"``.

The evaluation inputs and the float model's large weights go into Ray's object store once per
``Executor``; long-lived actors (``eval_worker.Worker``, one CPU each, started once per driver and
shared by its executors in turn) read them once (the weights in place, from the store's shared
memory) and run one serialised model variant per task (weightless: only what differs from the float
model travels), in
a single-threaded onnxruntime session, exactly as a process-pool worker does, so every output is
the same bit for bit whatever the pool and however many workers. Ray's ``ActorPool`` hands each
variant to an idle actor; each result comes back tagged with its submission index and is put back in
submission order. Variants are built and serialised lazily by the caller while earlier ones run,
at most two per actor ahead.

Faults are Ray's: an actor whose process dies is restarted (``max_restarts=-1``) and the task it was
running is retried on it (``max_task_retries``); after that many deaths on one variant the variant
is reported as killing its worker. A model onnxruntime refuses or fails is the model's fault: the
actor answers ``("error", message)``, which is reported at once and never retried. The evaluation
count is the caller's, incremented once per result received, so a retry is never counted twice.

``import ray`` is deferred to the first Ray pool: Ray is an optional extra (``qinject[ray]``), and
importing it costs a third of a second that no other command should pay.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from qinject.core.calib_data import QinjectWarning
from qinject.core.errors import QinjectError
from qinject.runtime import eval_worker

PROCESS, RAY = "process", "ray"
MAX_TASK_RETRIES = 2  # a variant that kills its worker three times running is the variant's fault
AHEAD = 2  # variants submitted per actor before the first result is awaited
START_TIMEOUT_S = 120.0  # an actor the cluster cannot place by then (no free CPU) is given up
# Actors by driver (cluster node, job) and kind: an actor starts a Python process (a second or two),
# so the signals and the search of one run share them rather than start their own. Each holds a CPU
# for its life, so a driver keeps one kind at a time: another kind's actors would wait for CPUs
# that the first kind never gives back.
_ACTORS: dict[tuple[str, str, str], list] = {}


def check(spec: str | None) -> str:
    """The executor named by ``spec`` (None: the process pool), refused in one line if unknown or if
    it needs Ray and Ray is not installed."""
    spec = PROCESS if spec is None else str(spec)
    if spec != PROCESS and not is_ray(spec):
        raise QinjectError(f"unknown executor {spec!r} (expected 'process', 'ray' for a local Ray, or "
                           "'ray://HOST:PORT' for an existing cluster)")
    if is_ray(spec) and importlib.util.find_spec("ray") is None:
        raise QinjectError(f"executor {spec!r} needs Ray, which is not installed: pip install 'qinject[ray]'")
    return spec


def is_ray(spec: str | None) -> bool:
    return spec == RAY or (spec or "").startswith("ray://")


def connect(spec: str) -> Any:
    """The ``ray`` module, initialised: an already initialised Ray is used as it is (a test's, a
    user's); ``"ray"`` starts a local one (or joins ``RAY_ADDRESS``, set in a Ray job's driver),
    ``"ray://HOST:PORT"`` connects to a cluster."""
    import ray  # deferred: an optional extra, 0.3 s to import (see the module docstring)

    if not ray.is_initialized():
        if spec == RAY:
            # Quiet and cheap: no dashboard, worker output not forwarded, no usage report from a
            # machine that may be offline.
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            # "local", not Ray's default search for a running cluster: a cluster that died leaves its
            # address in /tmp/ray, and ray.init() would wait on it.
            ray.init(address=os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False,
                     log_to_driver=False, logging_level=logging.ERROR)
        else:
            try:
                ray.init(address=spec, logging_level=logging.ERROR)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                first = str(exc).splitlines()[0] if str(exc) else ""
                raise QinjectError(f"cannot connect to the Ray cluster at {spec} ({type(exc).__name__}: {first}); "
                                   "is its client server on that port? With token authentication, set "
                                   "RAY_AUTH_MODE=token (and RAY_AUTH_TOKEN unless ~/.ray/auth_token holds "
                                   "the cluster's token)") from None
    return ray


class RayPool:
    """``workers`` actors (default: one per CPU of the cluster) holding ``inputs`` and ``shared``.

    The actors are ``worker`` objects (``eval_worker.Worker``: ``inputs`` are the evaluation inputs,
    ``shared`` the float model's weights, each job a serialised model and the names of the shared
    weights it lacks): ``run(index, job, [ObjectRef of inputs, ObjectRef of shared])`` answers
    ``(index, "ok", result)`` or ``(index, "error", message)`` and reads the inputs and weights
    whenever it does not hold them; ``forget()`` drops them; ``pid()`` is its process id;
    ``failure`` says what an error reply means.
    """

    def __init__(self, spec: str, workers: int | None, inputs: object, worker: type = eval_worker.Worker,
                 shared: object = None) -> None:
        ray = self.ray = connect(spec)
        from ray.util import ActorPool  # deferred with ray itself

        # The actor's code travels by value: a node runs it with numpy and onnxruntime, without qinject
        # (importing qinject would also cost every actor 1.6 s of start-up).
        ray.cloudpickle.register_pickle_by_value(eval_worker)
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        if workers is not None and workers > cpus:
            warnings.warn(f"{workers} Ray workers asked for, but the cluster has {cpus} CPUs: using {cpus} "
                          "(each actor holds one)", QinjectWarning, stacklevel=2)
        n = min(workers or cpus, cpus)
        # once; a restarted actor reads them again from the store
        self.inputs, self.shared = ray.put(inputs), ray.put(shared)
        self.worker = worker
        self.actors = _actors(ray, max(1, n), worker)
        self.pool = ActorPool(self.actors)

    def map(self, jobs: Iterable[Any], done: Callable[[], None]) -> list[Any]:
        """Each job's result (a serialised model's first output), in the order given; ``done()``
        after each result."""
        items = enumerate(jobs)
        results: dict[int, Any] = {}

        def submit() -> None:
            item = next(items, None)
            if item is not None:
                # the references nested in a list, so the actor reads them only when it lacks them
                self.pool.submit(lambda actor, job: actor.run.remote(*job, [self.inputs, self.shared]), item)

        for _ in range(AHEAD * len(self.actors)):
            submit()
        while self.pool.has_next():
            try:
                index, status, payload = self.pool.get_next_unordered()
            except self.ray.exceptions.RayError as exc:
                raise QinjectError(f"a Ray worker died {MAX_TASK_RETRIES + 1} times running one job "
                                   f"({type(exc).__name__}); the job may crash it ({self.worker.failure})") from None
            if status != "ok":
                raise QinjectError(f"{self.worker.failure}: {payload}")
            results[index] = payload
            done()
            submit()
        return [results[i] for i in range(len(results))]

    def pids(self) -> list[int]:
        """The process id of each actor (a restarted actor has a new one)."""
        return self.ray.get([a.pid.remote() for a in self.actors])

    def close(self) -> None:
        """Frees the inputs and weights; the actors stay for the next executor (Ray ends them with the
        driver)."""
        for actor in self.actors:
            actor.forget.remote()
        self.actors, self.inputs, self.shared = [], None, None


def _actors(ray: Any, n: int, worker: type) -> list:
    """``n`` ``worker`` actors of this driver on this cluster (fewer, with a warning, if the cluster
    cannot place them all), started on first need; this driver's actors of other kinds end."""
    context = ray.get_runtime_context()
    driver = (context.get_node_id(), context.get_job_id())
    key = (*driver, f"{worker.__module__}.{worker.__qualname__}")
    for other in [k for k in _ACTORS if k[:2] == driver and k != key]:
        for actor in _ACTORS.pop(other):
            ray.kill(actor)
    actors = _ACTORS.setdefault(key, [])
    if len(actors) < n:
        options = {"num_cpus": 1, "max_restarts": -1, "max_task_retries": MAX_TASK_RETRIES}
        remote = ray.remote(**options)(worker)
        new = [remote.remote() for _ in range(n - len(actors))]
        pings = [actor.pid.remote() for actor in new]
        ready, _ = ray.wait(pings, num_returns=len(pings), timeout=START_TIMEOUT_S)
        for actor, ping in zip(new, pings):
            if ping in ready:
                actors.append(actor)
            else:  # a task sent to it would wait for ever
                ray.kill(actor)
        if len(actors) < n:
            if not actors:
                raise QinjectError(f"no Ray actor started within {START_TIMEOUT_S:g} s: the cluster has no free "
                                   "CPU for qinject's workers")
            warnings.warn(f"only {len(actors)} of {n} Ray actors started within {START_TIMEOUT_S:g} s (no free "
                          "CPU for the others); evaluating on those", QinjectWarning, stacklevel=3)
    return actors[:n]
