"""One benchmark run over model artifacts: measure every target, attach accuracy, write the reports."""

from __future__ import annotations

import logging
from pathlib import Path

from tqdm import tqdm

from edgetl.artifact import Artifact
from edgetl.backends import targets_of
from edgetl.bench.machine import machine_info
from edgetl.bench.measure import RESULT_FORMAT, RESULT_VERSION, Shape, measure, peak_memory
from edgetl.bench.report import add_ratios, write_reports
from edgetl.recipe import BenchConfig
from edgetl.tasks import DEFAULT_TASK, TASKS, Task

log = logging.getLogger("edgetl")


def benchmark(artifacts: list[Artifact], texts: list, scores: dict[str, float], bench: BenchConfig,
              max_length: int, out_dir: Path, title: str = "", task: Task = TASKS[DEFAULT_TASK]) -> dict:
    """Every target of ``artifacts`` timed on ``texts`` (the task's model inputs: texts, pairs or word lists),
    with its evaluated ``scores`` (the task's metric by target key) beside it; reports written to ``out_dir``.

    Latency is batch 1 at the texts' own length, throughput batch ``bench.throughput_batch_size``, both timed
    by the engine `edgetl bench` uses: each round in a fresh process, noisy cells flagged.
    """
    targets = targets_of(artifacts, include_pytorch=bench.include_pytorch)
    if bench.max_sentences:
        texts = texts[: bench.max_sentences]
    latency, throughput = Shape(1, None), Shape(bench.throughput_batch_size, None)
    notes: list[str] = []
    with tqdm(total=bench.rounds, desc="benchmark rounds (one process each)") as progress:
        cells = measure(targets, texts, list(dict.fromkeys([latency, throughput])), [bench.threads],
                        max_length=max_length, rounds=bench.rounds, warmup=bench.warmup, max_calls=len(texts),
                        noise_threshold=bench.noise_threshold, progress=progress, notes=notes, task=task)
    rows = []
    for target in targets:
        timed = {(c["batch"], c["seq"]): c for c in cells if c["target"] == target.key}
        memory = peak_memory(target, texts[: bench.throughput_batch_size], bench.threads, task)
        rows.append({
            **timed[latency.batch, "own"], task.metric: scores.get(target.key),
            "model_mb": round(target.model_bytes / 1e6, 2),
            "throughput_per_s": timed[throughput.batch, "own"]["items_per_s"], **memory,
        })
    add_ratios(rows)
    machine = machine_info()
    result = {
        "format": RESULT_FORMAT, "format_version": RESULT_VERSION, "title": title,
        # `bench merge` names each input by its label; this one says it came from the stage.
        "label": f"{title} benchmark stage: {machine['cpu']}, {machine['usable_cores']} cores, "
                 f"{bench.threads or 'default'} threads",
        "task": task.name,
        "metric": {"name": task.metric, "scale": task.metric_scale},
        "machine": machine,
        "settings": {"sentences": len(texts), "warmup": bench.warmup, "rounds": bench.rounds,
                     "throughput_batch_size": bench.throughput_batch_size, "threads": bench.threads,
                     "noise_threshold": bench.noise_threshold},
        "notes": notes,
        "rows": rows,
    }
    write_reports(result, out_dir)
    for row in rows:
        log.info("benchmark: %-34s p50 %.2f ms%s  %s", row["target"], row["p50_ms"], " (noisy)" if row["noisy"] else "",
                 f"{row['speedup_vs_pytorch_fp32']}x vs PyTorch FP32" if row["speedup_vs_pytorch_fp32"] else "")
    return result
