"""`edgetl bench`: model targets x thread counts x batch sizes x sequence lengths, for choosing hardware.

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

import functools
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgetl.architectures.flops import folder_flops
from edgetl.backends import Target
from edgetl.bench.measure import SETTLE_SECONDS, _timed_calls, latency_summary
from edgetl.runtime.text import batch_size_for, encode, load_tokenizer, predict_logits

log = logging.getLogger("edgetl")

RESULT_FORMAT, RESULT_VERSION = "edgetl-bench-sweep", 1


@dataclass(frozen=True)
class Shape:
    batch: int
    seq: int | None  # None: the evaluation texts at their own length, each call padded to its longest


def shapes(batch_sizes: list[int], seq_lengths: list[int | None]) -> list[Shape]:
    return [Shape(b, s) for s in seq_lengths for b in batch_sizes]


def shape_feeds(folder, texts: list[str], shape: Shape, max_length: int, max_calls: int) -> list[dict]:
    """Calls of ``shape.batch`` consecutive texts: at their own length, or truncated/padded to ``shape.seq``."""
    tokenizer = load_tokenizer(folder, shape.seq or max_length)
    if shape.seq is not None:
        pad = tokenizer.token_to_id("[PAD]") or 0
        tokenizer.enable_padding(length=shape.seq, pad_id=pad)
    chunks = [texts[i:i + shape.batch] for i in range(0, len(texts) - shape.batch + 1, shape.batch)]
    if not chunks:  # fewer texts than one batch: repeat them
        chunks = [(texts * shape.batch)[: shape.batch]]
    return [encode(tokenizer, chunk) for chunk in chunks[:max_calls]]


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


def _cell(target_key: str, threads: int | None, cell: Shape) -> str:
    return f"{target_key}|{threads or 0}|{cell.batch}|{cell.seq or 'own'}"


def time_round(targets: list[Target], texts: list[str], cells: list[Shape], threads: list[int | None], *,
               max_length: int, warmup: int, max_calls: int, reverse: bool = False,
               notes: list[str] | None = None) -> dict[str, list[float]]:
    """One round in this process: seconds of every timed call, keyed by ``_cell``."""
    engines, usable = {}, []
    for target in targets:
        try:
            engines.update({(target.key, n): target.open(n) for n in threads})
            usable.append(target)
        except Exception as exc:  # e.g. an INT8 graph a GPU provider cannot take: skip it, say why
            if not optional(target):
                raise
            (notes if notes is not None else []).append(f"{target.key}: skipped ({type(exc).__name__}: {exc})")
    feeds = {(t.key, c): shape_feeds(t.folder, texts, c, max_length, max_calls) for t in usable for c in cells}
    times = {}
    for n in threads:
        for target in reversed(usable) if reverse else usable:
            engine = engines[target.key, n]
            if hasattr(engine, "activate"):
                engine.activate()
            time.sleep(SETTLE_SECONDS)
            for cell in cells:
                calls = feeds[target.key, cell]
                for feed in calls[:warmup]:
                    engine.run(feed)
                times[_cell(target.key, n, cell)] = _timed_calls(engine, calls)
    return times


def _target_spec(target: Target) -> dict:
    artifact = target.artifact
    return {"path": str(artifact.path), "manifest": artifact.manifest, "label": artifact.label,
            "backend": target.backend, "device": target.device, "pt2e": hasattr(target, "calibration")}


def _round_in_subprocess(targets: list[Target], calibration_texts: list[str], reverse: bool, **options) -> tuple:
    """``time_round`` in a fresh process, so that the spread between rounds includes what differs between
    processes (thread placement, memory layout, allocator state), not only what drifts within one."""
    import json
    import subprocess
    import sys

    spec = {"targets": [_target_spec(t) for t in targets], "calibration_texts": calibration_texts,
            "reverse": reverse, **options, "cells": [[c.batch, c.seq] for c in options["cells"]]}
    with tempfile.TemporaryDirectory(prefix="edgetl-round-") as scratch:
        spec_path, out_path = Path(scratch) / "spec.json", Path(scratch) / "times.json"
        spec_path.write_text(json.dumps(spec))
        done = subprocess.run([sys.executable, "-m", "edgetl.bench.sweep", str(spec_path), str(out_path)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"a benchmark round failed:\n{done.stderr[-3000:]}")
        result = json.loads(out_path.read_text())
    return result["times"], result["notes"]


def _round_main(spec_path: str, out_path: str) -> None:
    import json

    from edgetl.artifact import Artifact

    spec = json.loads(Path(spec_path).read_text())
    targets = []
    for t in spec["targets"]:
        artifact = Artifact(Path(t["path"]), t["manifest"], label=t["label"])
        if t["pt2e"]:
            targets += pt2e_variants([Target(artifact, "pytorch")], spec["calibration_texts"], spec["max_length"])
        else:
            targets.append(Target(artifact, t["backend"], t["device"]))
    notes = []
    times = time_round(targets, spec["texts"], [Shape(b, s) for b, s in spec["cells"]], spec["threads"],
                       max_length=spec["max_length"], warmup=spec["warmup"], max_calls=spec["max_calls"],
                       reverse=spec["reverse"], notes=notes)
    Path(out_path).write_text(json.dumps({"times": times, "notes": notes}))


def run_sweep(targets: list[Target], texts: list[str], cells: list[Shape], threads: list[int | None], *,
              max_length: int, rounds: int, warmup: int, max_calls: int, noise_threshold: float,
              peak_gflops: float | None = None, progress=None, notes: list[str] | None = None,
              calibration_texts: list[str] = (), isolate: bool = True) -> list[dict]:
    """``rounds`` rounds (each in its own process unless ``isolate`` is False), target order reversed every
    other round, summarised per (target, threads, shape) cell."""
    options = {"texts": texts, "cells": cells, "threads": threads, "max_length": max_length, "warmup": warmup,
               "max_calls": max_calls}
    per_round, round_notes = [], set()
    for round_index in range(rounds):
        reverse = round_index % 2 == 1
        if isolate:
            times, found = _round_in_subprocess(targets, list(calibration_texts), reverse, **options)
        else:
            found = []
            times = time_round(targets, reverse=reverse, notes=found, **options)
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
            cell_flops = call_flops(target.folder, shape_feeds(target.folder, texts, cell, max_length, max_calls))
            for n in threads:
                blocks = [r[_cell(target.key, n, cell)] for r in per_round]
                seconds = np.concatenate(blocks)
                medians = [float(np.median(b)) * 1e3 for b in blocks]
                spread = (max(medians) - min(medians)) / float(np.median(medians))
                row = {
                    "target": target.key, "artifact": getattr(target, "label", target.artifact.name),
                    "backend": target.backend, "device": target.device, "precision": target.precision,
                    "threads": n or 0, "batch": cell.batch, "seq": cell.seq or "own",
                    **latency_summary(list(seconds)),
                    "cv": round(float(seconds.std() / seconds.mean()), 4),
                    "round_p50_ms": [round(m, 4) for m in medians],
                    "round_spread": round(spread, 4),
                    "noisy": rounds > 1 and spread > noise_threshold,
                    "items_per_s": round(cell.batch * len(seconds) / float(seconds.sum()), 2),
                    "gflops_per_call": None, "achieved_gflops_per_s": None, "peak_fraction": None,
                }
                if cell_flops:
                    row["gflops_per_call"] = round(sum(cell_flops) / len(cell_flops) / 1e9, 4)
                    row["achieved_gflops_per_s"] = round(sum(cell_flops) * rounds / float(seconds.sum()) / 1e9, 2)
                    if peak_gflops:
                        row["peak_fraction"] = round(row["achieved_gflops_per_s"] / peak_gflops, 4)
                rows.append(row)
    return rows


def optional(target: Target) -> bool:
    """Whether a target that fails to open is skipped with a note (GPU variants, PT2E) instead of an error."""
    return getattr(target, "optional", target.device != "cpu")


def pt2e_variants(targets: list[Target], train_texts: list[str], max_length: int) -> list[Target]:
    """Neural Compressor PT2E INT8 of each PyTorch CPU target, calibrated on 96 training sentences."""
    from edgetl.bench.pt2e import PT2ETarget

    variants = []
    for target in targets:
        if target.backend == "pytorch" and target.device == "cpu":
            tokenizer = load_tokenizer(target.folder, max_length)
            calibration = tuple(encode(tokenizer, train_texts[i:i + 8]) for i in range(0, 96, 8))
            variants.append(PT2ETarget(target.artifact, "pytorch", calibration=calibration))
    return variants


def gpu_variants(targets: list[Target]) -> tuple[list[Target], list[str]]:
    """The GPU variants of CPU targets that this machine can run, and a note for each kind it cannot."""
    variants, notes = [], {}
    devices = {"pytorch": ["cuda"], "onnx": ["cuda", "tensorrt"], "openvino": ["gpu"]}
    for target in targets:
        for device in devices.get(target.backend, []):
            reason = _why_not(f"{target.backend}-{device}")
            if reason is None:
                variants.append(Target(target.artifact, target.backend, device))
            else:
                notes[f"{target.backend}-{device}"] = f"{target.backend} on {device}: skipped ({reason})"
    return variants, sorted(notes.values())


@functools.cache
def _why_not(kind: str) -> str | None:
    backend, device = kind.split("-")
    try:
        if backend == "pytorch":
            import torch

            return None if torch.cuda.is_available() else "torch sees no CUDA device"
        if backend == "onnx":
            import onnxruntime as ort

            provider = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}[device]
            if provider not in ort.get_available_providers():
                return f"onnxruntime has no {provider}; install onnxruntime-gpu on a machine with CUDA"
            return None
        import openvino as ov

        return None if "GPU" in ov.Core().available_devices else "OpenVINO lists no GPU device"
    except ImportError as exc:
        return f"{exc.name} is not installed"


def benchmark_sweep(artifacts: list, texts: list[str], labels: list[int] | None, train_texts: list[str], *,
                    out_dir, title: str, label: str, batch_sizes: list[int], seq_lengths: list[int | None],
                    threads: list[int | None], rounds: int, warmup: int, max_calls: int, noise_threshold: float,
                    peak_gflops: float | None, max_length: int, peers: bool, gpu: bool | str,
                    pt2e: bool = True) -> dict:
    """Accuracy and the sweep for every model target (plus peers and GPU variants); writes results.json."""
    import json

    from tqdm import tqdm

    from edgetl.backends import targets_of
    from edgetl.bench.machine import machine_info

    out_dir.mkdir(parents=True, exist_ok=True)
    scratch = tempfile.TemporaryDirectory(prefix="edgetl-peers-")  # peer models are rebuilt, never kept
    targets, notes, peer_of = targets_of(artifacts), [], {}
    if peers:
        peer_targets, peer_notes = build_peers(artifacts, Path(scratch.name), train_texts, max_length)
        targets += peer_targets
        notes += peer_notes
        peer_of = {t.key: t.artifact.name for t in peer_targets}
    if gpu:  # True: CPU and GPU targets; "only": GPU variants alone
        variants, gpu_notes = gpu_variants(targets)
        targets = variants if gpu == "only" else targets + variants
        notes += gpu_notes
    if pt2e and gpu != "only":
        targets += pt2e_variants(targets, train_texts, max_length)
    accuracy = {}
    for target in list(targets) if labels else []:
        try:
            accuracy[target.key] = target_accuracy(target, texts, labels, max_length)
        except Exception as exc:
            if not optional(target):
                raise
            targets.remove(target)
            notes.append(f"{target.key}: skipped ({type(exc).__name__}: {str(exc)[:300]})")
    cells = shapes(batch_sizes, seq_lengths)
    with tqdm(total=rounds, desc="benchmark rounds (one process each)") as progress:
        rows = run_sweep(targets, texts, cells, threads, max_length=max_length, rounds=rounds, warmup=warmup,
                         max_calls=max_calls, noise_threshold=noise_threshold, peak_gflops=peak_gflops,
                         progress=progress, notes=notes, calibration_texts=train_texts[:96])
    sizes = {t.key: round(t.model_bytes / 1e6, 2) for t in targets}
    scratch.cleanup()
    for row in rows:
        row.update(peer=peer_of.get(row["target"]), accuracy=accuracy.get(row["target"]), model_mb=sizes[row["target"]])
    result = {
        "format": RESULT_FORMAT, "format_version": RESULT_VERSION, "title": title, "label": label,
        "machine": machine_info(),
        "settings": {"rounds": rounds, "warmup": warmup, "max_calls": max_calls, "threads": [n or 0 for n in threads],
                     "batch_sizes": batch_sizes, "seq_lengths": [s or "own" for s in seq_lengths],
                     "noise_threshold": noise_threshold, "peak_gflops": peak_gflops, "texts": len(texts)},
        "notes": notes, "rows": rows,
    }
    (out_dir / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    for note in notes:
        log.info("bench: %s", note)
    return result


def build_peers(artifacts: list, out_dir, train_texts: list[str], max_length: int) -> tuple[list[Target], list[str]]:
    """Optimum's and OpenVINO's default INT8 models, from the first FP32 export among ``artifacts``."""
    from edgetl.bench.peers import openvino_default, optimum_default

    export = next((a for a in artifacts if a.kind == "exported"), None)
    if export is None:
        return [], ["peers: skipped (no FP32 export among the targets; benchmark a run folder or its export artifact)"]
    found, notes = [], []
    for backend, build in (("onnx", lambda: optimum_default(export, out_dir)),
                           ("openvino", lambda: openvino_default(export, out_dir, train_texts, max_length))):
        if backend not in export.models:
            notes.append(f"peers: no {backend} model in {export.name}")
            continue
        log.info("bench: building the %s peer from %s", "Optimum" if backend == "onnx" else "OpenVINO", export.name)
        found.append(Target(build(), backend))
    return found, notes


def target_accuracy(target: Target, texts: list[str], labels: list[int], max_length: int) -> float:
    """Accuracy on the evaluation texts, batched as the evaluate stage does."""
    logits = predict_logits(target.open(), load_tokenizer(target.folder, max_length), texts,
                            batch_size_for(target.batch_invariant), desc=f"accuracy {target.key}")
    return round(float((logits.argmax(-1) == np.asarray(labels)).mean()), 5)


if __name__ == "__main__":  # one isolated round: python -m edgetl.bench.sweep SPEC.json OUT.json
    import sys

    _round_main(sys.argv[1], sys.argv[2])
