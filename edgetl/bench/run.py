"""One benchmark run over model artifacts: measure every target, attach accuracy, write the reports."""

from __future__ import annotations

import logging
from pathlib import Path

from tqdm import tqdm

from edgetl.artifact import Artifact
from edgetl.backends import targets_of
from edgetl.bench.machine import machine_info
from edgetl.bench.measure import measure, peak_memory
from edgetl.bench.report import add_ratios, write_reports
from edgetl.recipe import BenchConfig
from edgetl.tasks import DEFAULT_TASK, TASKS, Task

log = logging.getLogger("edgetl")


def benchmark(artifacts: list[Artifact], texts: list, scores: dict[str, float], bench: BenchConfig,
              max_length: int, out_dir: Path, title: str = "", task: Task = TASKS[DEFAULT_TASK]) -> dict:
    """Every target of ``artifacts`` timed on ``texts`` (the task's model inputs: texts, pairs or word lists),
    with its evaluated ``scores`` (the task's metric by target key) beside it; reports written to ``out_dir``."""
    targets = targets_of(artifacts, include_pytorch=bench.include_pytorch)
    if bench.max_sentences:
        texts = texts[: bench.max_sentences]
    with tqdm(total=len(targets) * bench.rounds, desc="benchmark blocks") as progress:
        timings = measure(targets, texts, max_length=max_length, warmup=bench.warmup, rounds=bench.rounds,
                          batch_size=bench.throughput_batch_size, threads=bench.threads, progress=progress, task=task)
    rows = []
    for target in targets:
        memory = peak_memory(target, texts[: bench.throughput_batch_size], bench.threads, task)
        rows.append({
            "target": target.key, "artifact": target.artifact.name, "backend": target.backend,
            "precision": target.precision, task.metric: scores.get(target.key),
            "model_mb": round(target.model_bytes / 1e6, 2), **timings[target.key], **memory,
        })
    add_ratios(rows)
    result = {
        "title": title,
        "task": task.name,
        "metric": {"name": task.metric, "scale": task.metric_scale},
        "machine": machine_info(),
        "settings": {"sentences": len(texts), "warmup": bench.warmup, "rounds": bench.rounds,
                     "throughput_batch_size": bench.throughput_batch_size, "threads": bench.threads},
        "rows": rows,
    }
    write_reports(result, out_dir)
    for row in rows:
        log.info("benchmark: %-34s p50 %.2f ms  %s", row["target"], row["p50_ms"],
                 f"{row['speedup_vs_pytorch_fp32']}x vs PyTorch FP32" if row["speedup_vs_pytorch_fp32"] else "")
    return result
