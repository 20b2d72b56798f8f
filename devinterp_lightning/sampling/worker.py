"""Sampling snapshots off the training's critical path, in a worker process (no Lightning import).

The training process copies the weights (:func:`snapshot_request`) and goes on; a persistent
worker process (started with ``fork`` on Linux for a CPU worker before CUDA is initialized, else
with ``spawn``, the only method on Windows and the default on macOS: :func:`resolve_start_method`) owns a private copy of the model, the loss function and the probe data, and runs the
same :func:`~devinterp_lightning.sampling.estimator.estimate_llcs` call the synchronous monitor
runs, with the same seed, so for the same torch thread count the numbers are bitwise the same.

* :class:`SnapshotSampler`: estimates at a snapshot on its own model copy (also the in-process
  fallback when the worker dies);
* :class:`BackgroundSampler`: the worker process, its two queues and the snapshots in flight;
* :func:`pack_payload`: model, loss function and jobs as bytes, with a clear error when
  something cannot be sent to a spawned process.
"""

from __future__ import annotations

import io
import os
import pickle
import queue
import signal
import sys
import time
import traceback
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from devinterp_lightning.sampling.estimator import estimate_llcs
from devinterp_lightning.sampling.result import LLCResult
from devinterp_lightning.sampling.settings import SGLDSettings
from devinterp_lightning.sampling.snapshot import Restriction, take_snapshot
from devinterp_lightning.sampling.warm_start import ChainOffsets

__all__ = [
    "START_METHODS",
    "BackgroundSampler",
    "EstimateRequest",
    "SnapshotSampler",
    "WorkerDied",
    "WorkerError",
    "death_notice",
    "derive_seed",
    "pack_payload",
    "resolve_start_method",
    "serve_requests",
    "snapshot_request",
]

Jobs = Mapping[str, tuple[Iterable[Any], Restriction]]


def derive_seed(seed: int, step: int, rank: int) -> int:
    """The sampler seed for an estimate at ``step`` on ``rank``: distinct per step and per rank.

    A fixed odd-multiplier mix modulo ``2**63``, so the same (seed, step, rank) always gives the
    same chains, in the training process or in a worker.
    """
    return (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + rank * 0x94D049BB133111EB) % (1 << 63)


class WorkerError(RuntimeError):
    """The estimate raised inside the worker (the same error the synchronous mode would raise)."""


class WorkerDied(RuntimeError):
    """The worker process is gone (killed, out of memory, crashed in native code)."""


@dataclass(frozen=True)
class EstimateRequest:
    """One snapshot to sample: copies of the weights at ``step``, in the model's own dtypes, on CPU."""

    step: int
    params: dict[str, Tensor]
    buffers: dict[str, Tensor]
    settings: SGLDSettings
    seed: int
    #: burn-in of warm-started estimates (the worker keeps the chains' offsets between requests);
    #: None: every estimate starts at w*
    warm_start_burnin: int | None = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.params.values(), *self.buffers.values()))


def snapshot_request(model: nn.Module, step: int, settings: SGLDSettings, seed: int,
                     warm_start_burnin: int | None = None) -> EstimateRequest:
    """Copy ``model``'s parameters and buffers to CPU (dtype kept) for an estimate at ``step``."""
    snap = take_snapshot(model, torch.device("cpu"), None)
    return EstimateRequest(step, snap.params, snap.buffers, settings, seed, warm_start_burnin)


def pack_payload(model: nn.Module, loss_fn: Callable[..., Tensor], jobs: Jobs) -> bytes:
    """``torch.save`` of ``(model, loss_fn, jobs)``, for a process started with ``spawn``.

    Raises ``TypeError`` naming the part that cannot be pickled and how to fix it.
    """
    hints = {
        "loss_fn": "define it at the top level of an importable module (not a lambda or a function "
                   "nested in another) or pass a dotted import path such as 'examples.configs.losses.mse'",
        "the model": "make the LightningModule picklable (no open files, generators or lambdas as attributes)",
        "the probe data": "pass data= a DataLoader over a picklable dataset or a list of tensor batches "
                          "(a generator or an open stream cannot be sent)",
    }
    for label, obj in (("loss_fn", loss_fn), ("the model", model), ("the probe data", jobs)):
        try:
            pickle.dumps(obj)
        except Exception as err:
            raise TypeError(
                f"LLCMonitor(background=True) sends {label} to a worker process started with 'spawn', so it "
                f"must be picklable, and it is not ({type(err).__name__}: {err}). Fix: {hints[label]}; or use "
                "background=False."
            ) from err
    buffer = io.BytesIO()
    torch.save((model, loss_fn, dict(jobs)), buffer)
    return buffer.getvalue()


class SnapshotSampler:
    """Estimates at snapshots on a private copy of the model: ``estimate(request) -> {job: LLCResult}``."""

    def __init__(self, model: nn.Module, loss_fn: Callable[..., Tensor], jobs: Jobs,
                 device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.loss_fn = loss_fn
        self.jobs = dict(jobs)
        #: the chains' offsets between requests (warm starts), as in the synchronous monitor
        self.chain_offsets: ChainOffsets | None = None

    @classmethod
    def from_payload(cls, payload: bytes, device: torch.device | str = "cpu") -> SnapshotSampler:
        model, loss_fn, jobs = torch.load(io.BytesIO(payload), map_location=device, weights_only=False)
        return cls(model, loss_fn, jobs, device)

    def estimate(self, request: EstimateRequest) -> dict[str, LLCResult]:
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                p.copy_(request.params[name])
            for name, b in self.model.named_buffers():
                b.copy_(request.buffers[name])
        if request.warm_start_burnin is None:
            self.chain_offsets = None
        elif self.chain_offsets is None or self.chain_offsets.burnin_steps != request.warm_start_burnin:
            self.chain_offsets = ChainOffsets(burnin_steps=request.warm_start_burnin)
        return estimate_llcs(self.model, self.loss_fn, self.jobs, settings=request.settings, seed=request.seed,
                             device=self.device, dtype=torch.float32, warm_start=self.chain_offsets)


def serve_requests(payload: bytes, device: str, threads: int, cpus: list[int] | None,
                   requests: Any, results: Any) -> None:
    """The worker's main loop: estimate each request, put ``(kind, step, value)`` on ``results``;
    ``None`` ends it, and so does the death of the training process."""
    import multiprocessing

    torch.set_num_threads(threads)
    if cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, set(cpus))
    try:
        sampler = SnapshotSampler.from_payload(payload, device)
    except BaseException:
        results.put(("error", None, traceback.format_exc()))
        return
    results.put(("ready", None, time.time()))
    parent = multiprocessing.parent_process()
    while True:
        try:
            request = requests.get(timeout=1.0)
        except queue.Empty:
            if parent is not None and not parent.is_alive():
                return
            continue
        if request is None:
            return
        try:
            out = sampler.estimate(request)
        except Exception:
            results.put(("error", request.step, traceback.format_exc()))
            continue
        results.put(("ok", request.step, out))


def death_notice(pid: int | None, exitcode: int | None, in_flight: int, started: bool, start_method: str) -> str:
    """What a dead worker's warning says: how it ended (a signal, or an exit code), and the usual cause
    of a spawned worker that exits with an error before it is ready (an unguarded main script)."""
    if exitcode is not None and exitcode < 0:
        try:
            how = f"was killed by signal {signal.Signals(-exitcode).name} (exit code {exitcode})"
        except ValueError:
            how = f"was killed by signal {-exitcode} (exit code {exitcode})"
    else:
        how = f"died with exit code {exitcode}"
    notice = f"LLCMonitor: the sampling worker (pid {pid}) {how} while {in_flight} estimate(s) were in flight"
    if not started:
        notice += " before it had started"
        if start_method == "spawn" and exitcode is not None and exitcode > 0:
            notice += (". A process started with 'spawn' re-imports the main script: in a script, put the "
                       "training code under `if __name__ == \"__main__\":` (the worker's own error is printed above)")
    return notice


START_METHODS = ("auto", "spawn", "fork", "forkserver")


def resolve_start_method(start_method: str, device: torch.device | str) -> str:
    """The multiprocessing start method for the worker: ``"auto"`` is ``"fork"`` on Linux for a
    CPU worker while CUDA is not initialized in this process, else ``"spawn"``.

    ``fork`` starts in milliseconds because the child inherits the imported torch and Lightning
    (a spawned worker spends seconds re-importing them, longer than a short run); it is unsafe
    after CUDA has been initialized and unavailable on Windows, hence the conditions. The
    payload is pickled the same way under every method, so a script that runs here also runs
    where only ``spawn`` exists.
    """
    if start_method not in START_METHODS:
        raise ValueError(f"start_method must be one of {START_METHODS}; got {start_method!r}")
    if start_method != "auto":
        return start_method
    cpu_worker = torch.device(device).type == "cpu"
    if sys.platform.startswith("linux") and cpu_worker and not torch.cuda.is_initialized():
        return "fork"
    return "spawn"


def _terminate(process: Any) -> None:
    """Last resort at interpreter exit: a worker left running would make Python wait for it forever."""
    if process.is_alive():
        process.terminate()
        process.join(5.0)


class BackgroundSampler:
    """A worker process that samples :class:`EstimateRequest` s in submission order.

    ``pending`` holds the requests sent and not yet answered (their snapshots stay here, so a
    dead worker's work can be redone in-process); the caller bounds it.
    """

    def __init__(self, payload: bytes, device: torch.device | str = "cpu", threads: int = 1,
                 cpus: list[int] | None = None, start_method: str = "auto") -> None:
        self.start_method = resolve_start_method(start_method, device)
        context = torch.multiprocessing.get_context(self.start_method)
        self.payload = payload
        self.device = str(device)
        self.pending: deque[EstimateRequest] = deque()
        self._requests = context.Queue()
        self._results = context.Queue()
        # not a daemon: a daemonic process may not start children (a probe DataLoader's workers)
        self.process = context.Process(
            target=serve_requests, args=(payload, self.device, threads, cpus, self._requests, self._results),
            name="devinterp-llc-worker", daemon=False,
        )
        # no wait for the worker's imports (seconds): the first snapshot queues up meanwhile
        self._start_time = time.time()
        self.process.start()
        weakref.finalize(self, _terminate, self.process)
        self.started = False
        #: seconds from starting the process to the worker being ready to sample (imports, unpickling)
        self.startup_s: float | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def submit(self, request: EstimateRequest) -> None:
        if not self.process.is_alive():
            raise WorkerDied(self._death_notice())
        self.pending.append(request)
        self._requests.put(request)

    def _get(self, timeout: float | None) -> tuple[str, int | None, Any]:
        """The next answer (start-up notices are consumed here); ``queue.Empty`` after ``timeout`` s;
        :class:`WorkerDied` if the process is gone."""
        waited = 0.0
        while True:
            try:
                message = self._results.get(timeout=0.2 if timeout is None else min(0.2, timeout))
            except queue.Empty:
                if not self.process.is_alive():
                    try:  # a message may have arrived just before the exit
                        message = self._results.get(timeout=0.5)
                    except queue.Empty:
                        raise WorkerDied(self._death_notice()) from None
                else:
                    waited += 0.2
                    if timeout is not None and waited >= timeout:
                        raise
                    continue
            if message[0] == "ready":
                self.started = True
                self.startup_s = message[2] - self._start_time
                continue
            if message[0] == "error" and message[1] is None:
                raise WorkerError(f"LLCMonitor: the sampling worker failed to start:\n{message[2]}")
            return message

    def _death_notice(self) -> str:
        return death_notice(self.pid, self.process.exitcode, len(self.pending), self.started, self.start_method)

    def _answer(self, message: tuple[str, int | None, Any]) -> tuple[EstimateRequest, dict[str, LLCResult]]:
        kind, step, value = message
        request = self.pending.popleft()
        if kind == "error":
            raise WorkerError(f"LLCMonitor: the estimate at step {step} failed in the sampling worker:\n{value}")
        assert step == request.step, (step, request.step)  # one worker, one FIFO queue
        return request, value

    def ready(self) -> list[tuple[EstimateRequest, dict[str, LLCResult]]]:
        """The answers that have arrived, without waiting."""
        out = []
        while self.pending:
            try:
                out.append(self._answer(self._get(timeout=0.0)))
            except queue.Empty:
                break
        return out

    def wait(self, count: int | None = None) -> list[tuple[EstimateRequest, dict[str, LLCResult]]]:
        """Block until ``count`` answers (all pending ones when None) have arrived."""
        count = len(self.pending) if count is None else min(count, len(self.pending))
        return [self._answer(self._get(timeout=None)) for _ in range(count)]

    def redo_in_process(self) -> list[tuple[EstimateRequest, dict[str, LLCResult]]]:
        """After the worker died: stop it and estimate the pending snapshots here, with the same seeds."""
        self.close()
        sampler = SnapshotSampler.from_payload(self.payload, self.device)
        answers = [(request, sampler.estimate(request)) for request in self.pending]
        self.pending.clear()
        return answers

    def close(self, timeout: float = 10.0) -> None:
        """Stop the worker (politely, then by force); pending requests stay in ``pending``."""
        if self.process.is_alive():
            try:
                self._requests.put(None)
            except (ValueError, OSError):
                pass
            self.process.join(timeout)
            if self.process.is_alive():
                self.process.terminate()
                self.process.join(timeout)
        for q in (self._requests, self._results):
            q.cancel_join_thread()
            q.close()
