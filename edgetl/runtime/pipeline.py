"""A sharded model's parts run as one engine: each part in a worker process pinned to its own core, the workers
chained by pipes (``python -m edgetl.runtime.pipeline``: part 1 reads what part 0 writes, so while part 1 runs one
input part 0 runs the next, and a pipe's buffer bounds what waits between them), or one after another in this
process. numpy in, the model's outputs out; never torch.

Each part reads its tensors from what the caller fed and what the parts before it made (``edgetl.sharding`` wrote
which), and the tensors no later part reads are dropped as they go.
"""

from __future__ import annotations

import itertools
import json
import os
import pickle
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from concurrent.futures import Future
from pathlib import Path

import numpy as np

from edgetl.errors import ArtifactError, EngineError
from edgetl.runtime.engines import data_limit_mb, open_engine

IN_FLIGHT = 4  # inputs per part that run_many keeps in the pipeline: every part busy, little memory held


def carried(parts: list[dict], outputs: list[str], index: int) -> set[str]:
    """The tensors that leave part ``index``: what later parts read and what the model outputs."""
    return {t for p in parts[index + 1:] for t in p["inputs"]} | set(outputs)


def run_part(engine, part: dict, keep: set[str], tensors: dict) -> dict:
    tensors.update(engine.run_all({k: tensors[k] for k in part["inputs"]}))
    return {k: v for k, v in tensors.items() if k in keep}


class PipelineEngine:
    """The parts of a sharded model (the bundle manifest's ``models.<backend>.parts``) as one engine; ``run`` is
    thread-safe.

    Args:
        backend: 'onnx' or 'openvino'.
        folder: the bundle folder the parts' paths are relative to.
        parts: ``[{"path", "inputs", "outputs"}, ...]`` in order.
        outputs: the model's outputs (``models.<backend>.outputs``), the first of them what ``run`` returns.
        threads: threads per part (default 1 with workers, the runtime's choice inline).
        workers: each part in its own process, pinned to a core (round-robin over the cores this process may use);
            False: one after another in this process.
    """

    def __init__(self, backend: str, folder: Path, parts: list[dict], outputs: list[str], threads: int | None = None,
                 workers: bool = True):
        self.parts = parts
        made = {t for p in parts for t in p["outputs"]}
        self.input_names = list(dict.fromkeys(t for p in parts for t in p["inputs"] if t not in made))
        self.output_names = outputs
        self._keep = [carried(parts, outputs, index) for index in range(len(parts))]  # what leaves each part
        paths = [str(Path(folder) / p["path"]) for p in parts]
        self.workers = workers
        if not workers:
            self.engines = [open_engine(backend, path, threads) for path in paths]
            self.input_shapes = {k: v for e in self.engines for k, v in e.input_shapes.items() if k in self.input_names}
            return
        cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [None]
        self._processes, upstream = [], subprocess.PIPE
        for index, path in enumerate(paths):
            spec = {"backend": backend, "path": path, "threads": threads or 1, "core": cores[index % len(cores)],
                    "index": index, "part": parts[index], "keep": sorted(self._keep[index])}
            process = subprocess.Popen([sys.executable, "-m", "edgetl.runtime.pipeline", json.dumps(spec)],
                                       stdin=upstream, stdout=subprocess.PIPE)
            if index:
                upstream.close()  # the previous worker's output now belongs to this one alone
            upstream = process.stdout
            self._processes.append(process)
        self._in, self._out = self._processes[0].stdin, self._processes[-1].stdout
        self._finalizer = weakref.finalize(self, _stop, self._processes)
        try:
            _send(self._in, ("ready", [], {}))
        except OSError:  # the first worker is already gone; its exit code says why below
            pass
        ready = _receive(self._out)
        errors = [e for e in (ready[1] if ready else ["a worker exited while loading"]) if e]
        if errors:
            self.close()
            raise ArtifactError(f"{folder}: the sharded model did not load: {'; '.join(errors)}")
        self.input_shapes = {k: v for k, v in ready[2].items() if k in self.input_names}
        self._calls = _Calls()
        self._send_lock = threading.Lock()
        threading.Thread(target=_collect, args=(self._calls, self._out, self._processes), daemon=True,
                         name="edgetl-pipeline").start()

    def submit(self, feeds: dict[str, np.ndarray]) -> Future:
        """Starts one input through the parts; its future gives every output by name."""
        seq, future = self._calls.open()
        with self._send_lock:
            try:
                _send(self._in, (seq, {k: feeds[k] for k in self.input_names}))
            except (BrokenPipeError, OSError) as exc:
                self._calls.fail(f"the first part's process is gone ({exc})")
        return future

    def run_all(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.workers:
            return self.submit(feeds).result()
        tensors = {k: feeds[k] for k in self.input_names}
        for engine, part, keep in zip(self.engines, self.parts, self._keep, strict=True):
            tensors = run_part(engine, part, keep, tensors)
        return tensors

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.run_all(feeds)[self.output_names[0]]

    def run_many(self, feeds):
        """``run`` of each feed, in order, with every part busy on a different input."""
        if not self.workers:
            yield from map(self.run, feeds)
            return
        window: deque[Future] = deque()
        for feed in feeds:
            window.append(self.submit(feed))
            if len(window) >= IN_FLIGHT * len(self.parts):
                yield window.popleft().result()[self.output_names[0]]
        while window:
            yield window.popleft().result()[self.output_names[0]]

    def close(self) -> None:
        """Stops the worker processes (also done when the engine is garbage-collected, or at exit)."""
        if self.workers:
            self._finalizer()


def _send(stream, item) -> None:
    pickle.dump(item, stream, protocol=pickle.HIGHEST_PROTOCOL)
    stream.flush()


def _receive(stream):
    try:
        return pickle.load(stream)
    except EOFError:
        return None


class _Calls:
    """The calls waiting for the pipeline, by sequence number; shared with the thread that answers them (which holds
    no reference to the engine, so a dropped engine is collected and its workers stopped)."""

    def __init__(self):
        self.pending: dict[int, Future] = {}
        self.lock = threading.Lock()
        self.seq = itertools.count()
        self.broken: str | None = None

    def open(self) -> tuple[int, Future]:
        future = Future()
        with self.lock:
            if self.broken:
                raise EngineError(f"the sharded model's pipeline stopped: {self.broken}")
            seq = next(self.seq)
            self.pending[seq] = future
        return seq, future

    def answer(self, seq: int, tensors) -> None:
        with self.lock:
            future = self.pending.pop(seq)
        if isinstance(tensors, str):
            future.set_exception(EngineError(tensors))
        else:
            future.set_result(tensors)

    def fail(self, reason: str) -> None:
        with self.lock:
            self.broken = self.broken or reason
            pending, self.pending = self.pending, {}
        for future in pending.values():
            future.set_exception(EngineError(f"the sharded model's pipeline stopped: {reason}"))


def _collect(calls: _Calls, results, processes) -> None:
    """Hands each result of the last part to the call waiting for it; when the pipe ends (a worker died, or the
    engine was closed), fails every call still waiting."""
    while (item := _receive(results)) is not None:
        calls.answer(*item)
    # A killed worker's pipes close a moment before it can be reaped: give it that moment to show its exit code.
    deadline = time.monotonic() + 2.0
    while not (dead := [p for p in processes if p.poll() not in (None, 0)]) and time.monotonic() < deadline:
        if all(p.poll() is not None for p in processes):
            break
        time.sleep(0.01)
    if not dead:
        calls.fail("closed")
        return
    reason = f"part {processes.index(dead[0])}'s process ended (exit code {dead[0].returncode})"
    if dead[0].returncode < 0 and (limit := data_limit_mb()):  # killed by a signal, under a memory cap
        reason += f"; each process may use {limit} MB (edgetl --memory-mb), and a runtime short of memory can crash"
    calls.fail(reason)


def _stop(processes) -> None:
    try:
        processes[0].stdin.close()  # each worker ends at the end of its input, and so closes the next one's
    except OSError:
        pass
    for process in processes:
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


def _worker(spec: dict) -> None:
    """One part: frames in on stdin, frames out on stdout. The first frame is ("ready", [errors so far], {input
    shapes so far}): each worker adds its own error (None when its model loaded) and its inputs' shapes and passes
    it on; a worker that could not load passes it on and stops. Then (seq, tensors) frames, or (seq, message) when
    a part before it failed on that input."""
    source, sink = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # a runtime's prints must not corrupt the frames
    _, errors, shapes = _receive(source)
    try:
        if spec["core"] is not None:
            os.sched_setaffinity(0, {spec["core"]})
        engine = open_engine(spec["backend"], spec["path"], spec["threads"])
    except Exception as exc:  # noqa: BLE001 - reported to the loading process, which raises it
        _send(sink, ("ready", [*errors, f"part {spec['index']} ({Path(spec['path']).name}): {type(exc).__name__}: {exc}"],
                     shapes))
        return
    _send(sink, ("ready", [*errors, None], {**shapes, **engine.input_shapes}))
    keep = set(spec["keep"])
    while (item := _receive(source)) is not None:
        seq, tensors = item
        if not isinstance(tensors, str):
            try:
                tensors = run_part(engine, spec["part"], keep, tensors)
            except Exception as exc:  # noqa: BLE001 - the caller's call raises it
                tensors = f"part {spec['index']} ({Path(spec['path']).name}): {type(exc).__name__}: {exc}"
        _send(sink, (seq, tensors))


if __name__ == "__main__":  # a worker: python -m edgetl.runtime.pipeline SPEC_JSON
    _worker(json.loads(sys.argv[1]))
