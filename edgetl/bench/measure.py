"""The one timing engine: every latency edgetl reports (the benchmark stage, `edgetl bench`, the pruning
latency budget) is timed by ``timed_calls``; the rows it gives follow one versioned result format.

Every (target, threads, shape) cell is timed once per round, and each round runs in a fresh process, so
the spread between rounds also shows what differs from one process to the next (thread placement, memory
layout), which no repetition inside one process reveals. Within a round each target's blocks start after
a pause and the target order reverses every other round, because ONNX Runtime's and OpenVINO's spinning
threads slow whichever runtime runs next on a small machine. A cell whose per-round medians spread by more
than ``noise_threshold`` of their median is flagged ``noisy``: its p50 is not reproducible to that
precision on this machine now. The spread of single calls (IQR, coefficient of variation) is reported too;
at the evaluation texts' own lengths it mostly reflects the spread of lengths, not noise.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgetl.architectures.flops import folder_flops
from edgetl.backends import Target
from edgetl.runtime.text import encode, load_tokenizer
from edgetl.tasks import DEFAULT_TASK, TASKS, Task, task_for

SETTLE_SECONDS = 0.5  # lets the previous block's spinning threads go idle
# The results.json of the benchmark stage and of `edgetl bench`: title, label, machine, settings, notes and
# rows of ``_cell_row`` (the stage's rows are its batch-1 own-length cells plus its metric, throughput, size
# and memory columns, with "task" and "metric" beside the rows). `bench merge` also reads RESULT_FORMAT_V1.
RESULT_FORMAT, RESULT_VERSION = "edgetl-bench", 2
RESULT_FORMAT_V1 = ("edgetl-bench-sweep", 1)  # `edgetl bench` before the stage shared its format


def timed_calls(engine, feeds: list[dict], warmup: int = 0) -> list[float]:
    """Seconds of ``engine.run`` on each of ``feeds``, after untimed calls on the first ``warmup`` of them."""
    for feed in feeds[:warmup]:
        engine.run(feed)
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


@dataclass(frozen=True)
class Shape:
    batch: int
    seq: int | None  # None: the evaluation texts at their own length, each call padded to its longest


def round_ratios(row: dict, reference: dict) -> list[float]:
    """Each round's p50 of ``row`` over ``reference``'s in the same round (empty when the rounds do not pair up)."""
    rounds, ref_rounds = row.get("round_p50_ms") or [], reference.get("round_p50_ms") or []
    return [a / b for a, b in zip(rounds, ref_rounds, strict=True)] if rounds and len(rounds) == len(ref_rounds) else []


def round_ratio(row: dict, reference: dict) -> float:
    """``row``'s p50 over ``reference``'s: the median of their per-round ratios, since both met the same machine
    state in a round (on these shared machines whole rounds run up to 2x slower), else the ratio of their p50s."""
    ratios = sorted(round_ratios(row, reference))
    return round(float(ratios[len(ratios) // 2] if ratios else row["p50_ms"] / reference["p50_ms"]), 4)


def shapes(batch_sizes: list[int], seq_lengths: list[int | None]) -> list[Shape]:
    return [Shape(b, s) for s in seq_lengths for b in batch_sizes]


def shape_feeds(folder, texts: list, shape: Shape, max_length: int, max_calls: int,
                task: Task = TASKS[DEFAULT_TASK]) -> list[dict]:
    """Calls of ``shape.batch`` consecutive texts (the task's model inputs: texts, pairs or word lists): at
    their own length, or truncated/padded to ``shape.seq``."""
    tokenizer = load_tokenizer(folder, shape.seq or max_length)
    if shape.seq is not None:
        pad = tokenizer.token_to_id("[PAD]") or 0
        tokenizer.enable_padding(length=shape.seq, pad_id=pad)
    chunks = [texts[i:i + shape.batch] for i in range(0, len(texts) - shape.batch + 1, shape.batch)]
    if not chunks:  # fewer texts than one batch: repeat them
        chunks = [(texts * shape.batch)[: shape.batch]]
    return [encode(tokenizer, chunk, task.pretokenized) for chunk in chunks[:max_calls]]


def call_flops(folder, feeds: list[dict]) -> list[float] | None:
    """FLOPs of each call: every row at the call's padded length (padding is computed too)."""
    per_length: dict[int, float | None] = {}
    flops = []
    for feed in feeds:
        rows, length = feed["input_ids"].shape
        if length not in per_length:
            per_length[length] = folder_flops(folder, [length])
        if per_length[length] is None:
            return None
        flops.append(rows * per_length[length])
    return flops


def optional(target: Target) -> bool:
    """Whether a target that fails to open is skipped with a note (GPU variants, PT2E) instead of an error."""
    return getattr(target, "optional", target.device != "cpu")


def _cell(target_key: str, threads: int | None, cell: Shape) -> str:
    return f"{target_key}|{threads or 0}|{cell.batch}|{cell.seq or 'own'}"


def time_round(targets: list[Target], texts: list, cells: list[Shape], threads: list[int | None], *,
               max_length: int, warmup: int, max_calls: int, reverse: bool = False,
               notes: list[str] | None = None, task: Task = TASKS[DEFAULT_TASK]) -> dict[str, list[float]]:
    """One round in this process: seconds of every timed call, keyed by ``_cell``."""
    engines, usable = {}, []
    for target in targets:
        try:
            engines.update({(target.key, n): target.open(n, task) for n in threads})
            usable.append(target)
        except Exception as exc:  # e.g. an INT8 graph a GPU provider cannot take: skip it, say why
            if not optional(target):
                raise
            (notes if notes is not None else []).append(f"{target.key}: skipped ({type(exc).__name__}: {exc})")
    feeds = {(t.key, c): shape_feeds(t.folder, texts, c, max_length, max_calls, task) for t in usable for c in cells}
    times = {}
    for n in threads:
        for target in reversed(usable) if reverse else usable:
            engine = engines[target.key, n]
            if hasattr(engine, "activate"):
                engine.activate()
            time.sleep(SETTLE_SECONDS)
            for cell in cells:
                times[_cell(target.key, n, cell)] = timed_calls(engine, feeds[target.key, cell], warmup)
    return times


def target_spec(target: Target) -> dict:
    """What a fresh process needs to open ``target`` again (its artifact folder, manifest, label and backend)."""
    artifact = target.artifact
    return {"path": str(artifact.path), "manifest": artifact.manifest, "label": artifact.label,
            "backend": target.backend, "device": target.device, "pt2e": hasattr(target, "calibration")}


def _round_in_subprocess(targets: list[Target], calibration_texts: list[str], reverse: bool, task: Task,
                         **options) -> tuple:
    """``time_round`` in a fresh process, so that the spread between rounds includes what differs between
    processes (thread placement, memory layout, allocator state), not only what drifts within one."""
    spec = {"targets": [target_spec(t) for t in targets], "calibration_texts": calibration_texts,
            "reverse": reverse, "task": task.name, **options, "cells": [[c.batch, c.seq] for c in options["cells"]]}
    result = in_fresh_process("edgetl.bench.measure", spec, "a benchmark round")
    return result["times"], result["notes"]


def in_fresh_process(module: str, spec: dict, what: str) -> dict:
    """``python -m MODULE SPEC.json OUT.json`` in a fresh process: ``spec`` in, the JSON the module writes out;
    RuntimeError naming ``what``, with the end of its stderr, if it fails."""
    with tempfile.TemporaryDirectory(prefix="edgetl-bench-") as scratch:
        spec_path, out_path = Path(scratch) / "spec.json", Path(scratch) / "out.json"
        spec_path.write_text(json.dumps(spec))
        done = subprocess.run([sys.executable, "-m", module, str(spec_path), str(out_path)], capture_output=True,
                              text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{what} failed:\n{done.stderr[-3000:]}")
        return json.loads(out_path.read_text())


def _round_main(spec_path: str, out_path: str) -> None:
    from edgetl.artifact import Artifact
    from edgetl.bench.pt2e import pt2e_variants

    spec = json.loads(Path(spec_path).read_text())
    task = task_for(spec["task"])
    targets = []
    for t in spec["targets"]:
        artifact = Artifact(Path(t["path"]), t["manifest"], label=t["label"])
        if t["pt2e"]:
            targets += pt2e_variants([Target(artifact, "pytorch")], spec["calibration_texts"], spec["max_length"])
        else:
            targets.append(Target(artifact, t["backend"], t["device"]))
    texts = [t if task.pretokenized or isinstance(t, str) else tuple(t) for t in spec["texts"]]  # JSON made pairs lists
    notes = []
    times = time_round(targets, texts, [Shape(b, s) for b, s in spec["cells"]], spec["threads"],
                       max_length=spec["max_length"], warmup=spec["warmup"], max_calls=spec["max_calls"],
                       reverse=spec["reverse"], notes=notes, task=task)
    Path(out_path).write_text(json.dumps({"times": times, "notes": notes}))


def measure(targets: list[Target], texts: list, cells: list[Shape], threads: list[int | None], *,
            max_length: int, rounds: int, warmup: int, max_calls: int, noise_threshold: float,
            peak_gflops: float | None = None, progress=None, notes: list[str] | None = None,
            calibration_texts: list[str] = (), isolate: bool = True, task: Task = TASKS[DEFAULT_TASK]) -> list[dict]:
    """``rounds`` rounds (each in its own process unless ``isolate`` is False), target order reversed every
    other round, summarised per (target, threads, shape) cell with a ``noisy`` flag."""
    options = {"texts": texts, "cells": cells, "threads": threads, "max_length": max_length, "warmup": warmup,
               "max_calls": max_calls}
    per_round, round_notes = [], set()
    for round_index in range(rounds):
        reverse = round_index % 2 == 1
        if isolate:
            times, found = _round_in_subprocess(targets, list(calibration_texts), reverse, task, **options)
        else:
            found = []
            times = time_round(targets, reverse=reverse, notes=found, task=task, **options)
        per_round.append(times)
        round_notes.update(found)
        if progress:
            progress.update(1)
    if notes is not None:
        notes += sorted(round_notes)
    timed = [t for t in targets if all(_cell(t.key, threads[0], cells[0]) in r for r in per_round)]
    rows = []
    for target in timed:
        for cell in cells:
            cell_flops = call_flops(target.folder, shape_feeds(target.folder, texts, cell, max_length, max_calls, task))
            for n in threads:
                rows.append(_cell_row(target, n, cell, [r[_cell(target.key, n, cell)] for r in per_round],
                                      cell_flops, noise_threshold, peak_gflops))
    return rows


def _cell_row(target: Target, threads: int | None, cell: Shape, blocks: list[list[float]],
              cell_flops: list[float] | None, noise_threshold: float, peak_gflops: float | None) -> dict:
    seconds = np.concatenate(blocks)
    medians = [float(np.median(b)) * 1e3 for b in blocks]
    spread = (max(medians) - min(medians)) / float(np.median(medians))
    row = {
        "target": target.key, "artifact": getattr(target, "label", target.artifact.name),
        "backend": target.backend, "device": target.device, "precision": target.precision,
        "threads": threads or 0, "batch": cell.batch, "seq": cell.seq or "own",
        **latency_summary(list(seconds)),
        "cv": round(float(seconds.std() / seconds.mean()), 4),
        "round_p50_ms": [round(m, 4) for m in medians],
        "round_spread": round(spread, 4),
        "noisy": len(blocks) > 1 and spread > noise_threshold,
        "items_per_s": round(cell.batch * len(seconds) / float(seconds.sum()), 2),
        "gflops_per_call": None, "achieved_gflops_per_s": None, "peak_fraction": None,
    }
    if cell_flops:
        row["gflops_per_call"] = round(sum(cell_flops) / len(cell_flops) / 1e9, 4)
        row["achieved_gflops_per_s"] = round(sum(cell_flops) * len(blocks) / float(seconds.sum()) / 1e9, 2)
        if peak_gflops:
            row["peak_fraction"] = round(row["achieved_gflops_per_s"] / peak_gflops, 4)
    return row


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


if __name__ == "__main__":  # one isolated round: python -m edgetl.bench.measure SPEC.json OUT.json
    _round_main(sys.argv[1], sys.argv[2])
