"""Measuring: batch-1 latency, batch throughput and peak memory of each target, in isolated blocks.

ONNX Runtime and OpenVINO keep their worker threads spinning for a while after a call; on a small
machine, interleaving calls of two runtimes slows whichever runs next. So each target is timed in its
own block, with a pause before it, and the block order is reversed every other round.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np

from edgetl.backends import Target
from edgetl.runtime.text import encode, load_tokenizer
from edgetl.tasks import DEFAULT_TASK, TASKS, Task

SETTLE_SECONDS = 0.5  # lets the previous block's spinning threads go idle


def _timed_calls(engine, feeds: list[dict]) -> list[float]:
    times = []
    for feed in feeds:
        start = time.perf_counter()
        engine.run(feed)
        times.append(time.perf_counter() - start)
    return times


def latency_summary(seconds: list[float]) -> dict:
    ms = np.asarray(seconds) * 1e3
    q1, q3 = np.percentile(ms, [25, 75])
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 4),
        "p90_ms": round(float(np.percentile(ms, 90)), 4),
        "p99_ms": round(float(np.percentile(ms, 99)), 4),
        "mean_ms": round(float(ms.mean()), 4),
        "iqr_ms": round(float(q3 - q1), 4),
        "calls": int(ms.size),
    }


def measure(targets: list[Target], texts: list, *, max_length: int, warmup: int, rounds: int,
            batch_size: int, threads: int | None, progress=None, task: Task = TASKS[DEFAULT_TASK]) -> dict[str, dict]:
    """Latency at batch 1 over ``texts`` (the task's model inputs) at their own length, and throughput at
    ``batch_size``."""
    engines, single, batched = {}, {}, {}
    words = task.pretokenized
    for target in targets:
        tokenizer = load_tokenizer(target.folder, max_length)
        engines[target.key] = target.open(threads, task)
        single[target.key] = [encode(tokenizer, [t], words) for t in texts]
        batched[target.key] = [encode(tokenizer, texts[i : i + batch_size], words) for i in range(0, len(texts), batch_size)]
    latency = {t.key: [] for t in targets}
    round_p50 = {t.key: [] for t in targets}
    throughput = {t.key: [] for t in targets}
    for round_index in range(rounds):
        order = targets if round_index % 2 == 0 else list(reversed(targets))
        for target in order:
            engine, feeds = engines[target.key], single[target.key]
            time.sleep(SETTLE_SECONDS)
            for feed in feeds[:warmup]:
                engine.run(feed)
            times = _timed_calls(engine, feeds)
            latency[target.key] += times
            round_p50[target.key].append(round(float(np.median(times)) * 1e3, 4))
            start = time.perf_counter()
            _timed_calls(engine, batched[target.key])
            throughput[target.key].append(len(texts) / (time.perf_counter() - start))
            if progress:
                progress.update(1)
    results = {}
    for target in targets:
        summary = latency_summary(latency[target.key])
        summary["round_p50_ms"] = round_p50[target.key]
        summary["throughput_per_s"] = round(float(np.median(throughput[target.key])), 2)
        results[target.key] = summary
    return results


_MEMORY_PROBE = """
import json, sys
from pathlib import Path

def high_water_mb():
    # VmHWM is this process's own peak; ru_maxrss would include the parent's peak at fork time.
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

from edgetl.artifact import Artifact
from edgetl.backends import Target
from edgetl.runtime.text import encode, load_tokenizer
from edgetl.tasks import task_for
before = high_water_mb()
task = task_for(sys.argv[5])
target = Target(Artifact.load(sys.argv[1]), sys.argv[2])
engine = target.open(int(sys.argv[4]) if sys.argv[4] != "0" else None, task)
texts = [t if task.pretokenized or isinstance(t, str) else tuple(t) for t in json.loads(sys.argv[3])]  # pairs
engine.run(encode(load_tokenizer(target.folder, 512), texts, task.pretokenized))
after = high_water_mb()
print(json.dumps({"peak_rss_mb": round(after, 1), "model_rss_mb": round(after - before, 1)}))
"""


def peak_memory(target: Target, texts: list, threads: int | None, task: Task = TASKS[DEFAULT_TASK]) -> dict:
    """Peak resident memory of a fresh process that loads the target and predicts one batch.

    ``model_rss_mb`` excludes what the interpreter and imports held before loading the model.
    """
    args = [sys.executable, "-c", _MEMORY_PROBE, str(target.artifact.path), target.backend, json.dumps(texts), str(threads or 0),
            task.name]
    if target.backend == "pytorch":
        # Import torch before the baseline so that the model's own memory is what remains.
        args[2] = "import torch, transformers\n" + _MEMORY_PROBE
    else:
        args[2] = f"import {'onnxruntime' if target.backend == 'onnx' else 'openvino'}\n" + _MEMORY_PROBE
    done = subprocess.run(args, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        return {"peak_rss_mb": None, "model_rss_mb": None, "memory_error": done.stderr.strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])
