"""Running cells on Ray: actors that each load one model once and take that model's cells.

Ray itself is imported only for `--ray`. A worker returns a cell's files; the driver writes them
(probe.cells.write_output), so a killed worker leaves nothing half-written. A killed actor is restarted by Ray and its
cell retried there (`max_restarts`, `max_task_retries`); the driver writes each cell once, whichever try finished it.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from collections import deque
from collections.abc import Sequence
from urllib.parse import urlsplit

import torch
from tqdm import tqdm

from probe.backends.loading import check_device_name
from probe.cells import Cell, Executor, LoadedModel, ModelSpec, OnDone, Progress, finish
from probe.data import FactData
from probe.errors import ModelError, SettingError
from probe.vocab import CandidateChoice

RETRIES = 3  # restarts of a dead actor, and tries of the cell it was running
LOAD_TIMEOUT = 1800.0  # seconds for new workers to be placed and load their model


def _ray():
    try:
        import ray
    except ImportError:
        raise SettingError("--ray needs Ray, which is not installed: pip install 'probe[ray]'") from None
    return ray


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """A HOST:PORT (or ray://HOST:PORT) that accepts no connection is a ProbeError, before Ray waits on it."""
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host, port = None, None
    if not host or not port:
        raise SettingError(f"--ray {address!r}: expected 'auto', HOST:PORT or ray://HOST:PORT (or --ray alone for a local Ray)")
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        raise SettingError(f"Ray cluster at {address} cannot be reached ({e.strerror or e})") from None


def connect(address: str = "local", num_cpus: int | None = None) -> bool:
    """Join the cluster at `address` ('auto', HOST:PORT) or start a local Ray ('local'); True if this call started it."""
    ray = _ray()
    if ray.is_initialized():
        return False
    if address not in ("local", "auto"):
        check_reachable(address)
    env = {"TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.update({k: os.environ[k] for k in ("PROBE_CACHE", "PROBE_DATA", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
                if k in os.environ})
    try:
        ray.init(address=None if address == "local" else address, num_cpus=num_cpus if address == "local" else None,
                 include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
                 runtime_env={"env_vars": env})
    except ConnectionError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SettingError(f"no Ray cluster at {address!r}: {first}") from None
    return True


class CellActor:
    """One model, loaded once; runs the cells it is given and returns their files.

    The data reaches it with each call, not through its constructor: Ray cannot promise a restarted actor the
    object-store arguments of its constructor (ray#53727). A restarted actor loads again on its next cell.
    """

    def __init__(self, spec: ModelSpec, candidates: CandidateChoice | str, threads: int):
        torch.set_num_threads(threads)
        self.spec, self.candidates = spec, candidates
        self.loaded: LoadedModel | None = None

    def load(self, data: list) -> int:
        """Load the model unless loaded; `data` is [the FactData's object ref], fetched only then. Returns the pid."""
        if self.loaded is None:
            self.loaded = LoadedModel.load(self.spec, _ray().get(data[0]), self.candidates)
            self.loaded.remote = True
        return os.getpid()

    def run(self, cell: Cell, data: list):
        """Every member's (cell, output) of a cell (a pack has several), the seconds it took, and this worker's pid."""
        t0 = time.time()
        pid = self.load(data)
        return list(cell.outputs(self.loaded)), time.time() - t0, pid


class RayExecutor(Executor):
    """Runs cells on Ray actors: one per GPU when the cluster has GPUs, else one per `cpus_per_worker` CPUs, each
    with `threads` torch threads (default: its CPUs).

    Models share the workers: each model with cells waiting gets an equal share; once a model's cells are done,
    its workers are freed for the models with the most cells left.
    """

    local = False

    def __init__(self, data: FactData, candidates: CandidateChoice | str, address: str = "local", cpus_per_worker: int = 1,
                 workers: int | None = None, log=print, threads: int | None = None):
        if cpus_per_worker < 1:
            raise SettingError(f"--cpus-per-worker must be at least 1, got {cpus_per_worker}")
        self.data = data
        self.candidates = candidates
        self.address = address
        self.cpus_per_worker = cpus_per_worker
        self._threads = threads or cpus_per_worker
        self.log = log
        t0 = time.time()
        self.started_ray = connect(address)
        ray = _ray()
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        self.gpus = sum(int(n.get("GPU", 0)) for n in nodes)
        slots = self.gpus or sum(int(n.get("CPU", 0)) // cpus_per_worker for n in nodes)  # a worker fits on one node
        if slots < 1:
            raise SettingError(f"no node of the Ray cluster has --cpus-per-worker {cpus_per_worker} CPUs (the largest has "
                               f"{max((int(n.get('CPU', 0)) for n in nodes), default=0)})")
        self.slots = min(slots, workers) if workers else slots
        kind = "GPU" if self.gpus else f"{cpus_per_worker} CPU"
        log(f"Ray {'started' if self.started_ray else 'joined'} in {time.time() - t0:.1f}s: {self.slots} worker(s) of {kind}")
        self.on_dispatch = None  # tests: called with (cell, actor) when a cell is sent to an actor
        self.actor_pids: dict = {}  # actor -> pid at start (a different pid in a result means the actor restarted)
        self.retried: list[str] = []  # keys of cells whose actor died and which ran again

    @property
    def device(self) -> str:
        """The device the workers load models on."""
        return "cuda" if self.gpus else "cpu"

    @property
    def threads(self) -> int:
        return self._threads

    def check_device(self, device: str) -> None:
        """A CUDA device on a cluster without GPUs is a ProbeError (its workers could never be placed)."""
        check_device_name(device)
        if device.startswith("cuda") and not self.gpus:
            raise ModelError(f"--device {device}: the Ray cluster has no GPU")

    def run(self, cells: Sequence[Cell], on_done: OnDone | None = None, desc: str = "cells") -> Progress:
        ray = _ray()
        todo = [c for c in cells if not c.done()]
        progress = Progress(todo, desc)
        queues = {spec: deque(c for c in todo if c.model == spec) for spec in dict.fromkeys(c.model for c in todo)}
        data = [ray.put(self.data)]  # a ref in a list: actors fetch it only when they load
        actor_class = ray.remote(CellActor)
        actors: dict = {}  # actor -> spec
        pending: dict = {}  # result ref -> (cell, actor, start time)

        def start_actors() -> None:
            def add(spec: ModelSpec) -> None:  # a worker on the spec's device: a GPU of its own for CUDA
                gpu = spec.device.startswith("cuda")
                actor = actor_class.options(num_cpus=0 if gpu else self.cpus_per_worker, num_gpus=1 if gpu else 0,
                                            max_restarts=RETRIES, max_task_retries=RETRIES).remote(
                    spec, self.candidates, self.threads)
                actors[actor] = spec

            waiting = [s for s, q in queues.items() if q and s not in actors.values()]
            free = self.slots - len(actors)
            for i, spec in enumerate(waiting[:free]):  # models without a worker: an equal share of the free slots
                share = free // min(len(waiting), free) + (i < free % min(len(waiting), free))
                for _ in range(min(share, len(queues[spec]))):
                    add(spec)
            while len(actors) < self.slots:  # slots still free: to the models with the most cells left per worker
                workers = {s: list(actors.values()).count(s) for s in queues}
                left = {s: len(q) / (1 + workers[s]) for s, q in queues.items() if len(q) > workers[s]}
                if not left:
                    break
                add(max(left, key=left.get))
            new = [a for a in actors if a not in self.actor_pids]
            if new:
                t0 = time.time()
                try:
                    self.actor_pids.update(zip(new, ray.get([a.load.remote(data) for a in new], timeout=LOAD_TIMEOUT),
                                               strict=True))
                except ray.exceptions.GetTimeoutError:
                    raise SettingError(f"Ray workers were not up {LOAD_TIMEOUT:.0f}s after they were asked for: the cluster "
                                       "cannot place them, or their model loads too slowly") from None
                except ray.exceptions.RayError as e:
                    raise ModelError(f"a Ray worker could not load its model: {_reason(e)}") from None
                names = ", ".join(sorted({actors[a].name for a in new}))
                tqdm.write(f"{len(new)} worker(s) loaded {names} in {time.time() - t0:.1f}s", file=sys.stderr)

        def dispatch(actor) -> None:
            """Send the actor its model's next unfinished cell; with none left, free the actor."""
            spec, cell = actors[actor], None
            while queues[spec] and cell is None:
                cell = queues[spec].popleft()
                for member in cell.members:
                    if member.done():  # finished meanwhile by another process sharing the folder
                        progress.skipped(member)
                if cell.done():
                    cell = None
            if cell is None:
                del actors[actor]
                ray.kill(actor)
                return
            if self.on_dispatch:
                self.on_dispatch(cell, actor)
            pending[actor.run.remote(cell, data)] = (cell, actor, time.time())
            progress.started(sum(not m.done() for m in cell.members))

        try:
            start_actors()
            for actor in list(actors):
                dispatch(actor)
            while pending:
                (ref,), _ = ray.wait(list(pending), num_returns=1)
                cell, actor, t0 = pending.pop(ref)
                try:
                    outputs, _, pid = ray.get(ref)
                except ray.exceptions.RayTaskError as e:  # the cell itself raised
                    for member in (m for m in cell.members if not m.done()):
                        progress.finished(member, time.time() - t0, _reason(e))
                except ray.exceptions.RayError as e:  # the worker died more often than it may restart, or Ray failed
                    for member in (m for m in cell.members if not m.done()):
                        progress.finished(member, time.time() - t0, f"worker lost: {_reason(e)}")
                    actors.pop(actor, None)
                    self.actor_pids.pop(actor, None)
                    ray.kill(actor)
                    actor = None
                else:
                    if pid != self.actor_pids.get(actor):
                        self.retried.append(cell.key)
                        self.actor_pids[actor] = pid
                    for member, output in outputs:
                        finish(member, output, on_done)
                        progress.finished(member, time.time() - t0)
                if actor is not None:
                    dispatch(actor)
                if len(actors) < self.slots and any(queues.values()):
                    start_actors()
                    for a in [a for a in actors if not any(v[1] is a for v in pending.values())]:
                        dispatch(a)
        finally:
            progress.close()
            for actor in actors:
                ray.kill(actor)
            if self.retried:
                self.log(f"{len(self.retried)} cell(s) ran again after their worker died: {', '.join(self.retried)}")
        return progress

    def close(self) -> None:
        """Shut down the local Ray this executor started (a joined cluster keeps running)."""
        if self.started_ray:
            _ray().shutdown()


def _reason(error: Exception) -> str:
    """The last line of a Ray error: the cell's own exception, without Ray's traceback."""
    cause = getattr(error, "cause", None)
    if cause is not None and str(cause).strip():
        return f"{type(cause).__name__}: {str(cause).strip().splitlines()[-1]}"
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__
