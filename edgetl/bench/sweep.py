"""`edgetl bench`: model targets x thread counts x batch sizes x sequence lengths, for choosing hardware.

Beyond the run's own artifacts it times Optimum's and OpenVINO's default INT8 models (peers), PyTorch INT8
through Neural Compressor's PT2E path and the GPU backends the machine has, and scores each target's accuracy.
The timing itself (a fresh process per round, noise flags) is ``edgetl.bench.measure``'s, as for the
benchmark stage.
"""

from __future__ import annotations

import functools
import logging
import tempfile
from pathlib import Path

import numpy as np

from edgetl.backends import Target
from edgetl.bench.measure import RESULT_FORMAT, RESULT_VERSION, measure, optional, shapes
from edgetl.bench.pt2e import pt2e_variants
from edgetl.runtime.text import batch_size_for, load_tokenizer, predict_logits

log = logging.getLogger("edgetl")


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
        rows = measure(targets, texts, cells, threads, max_length=max_length, rounds=rounds, warmup=warmup,
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
