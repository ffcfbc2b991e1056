"""`edgetl bench`: model targets x thread counts x batch sizes x sequence lengths, for choosing hardware.

Every (target, threads, shape) cell is timed in ``rounds`` blocks; the block order of the targets reverses
every other round and each target's blocks start after a pause, because ONNX Runtime's and OpenVINO's
spinning threads slow whichever runtime runs next on a small machine. A cell whose per-round medians spread
by more than ``noise_threshold`` of their median is flagged ``noisy``: its p50 is not reproducible to that
precision on this machine now. The spread of single calls (IQR, coefficient of variation) is reported too;
at the evaluation texts' own lengths it mostly reflects the spread of lengths, not noise.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgetl.backends import Target
from edgetl.bench.flops import folder_flops
from edgetl.bench.measure import SETTLE_SECONDS, _timed_calls, latency_summary
from edgetl.runtime.text import encode, load_tokenizer

log = logging.getLogger("edgetl")

RESULT_FORMAT, RESULT_VERSION = "edgetl-bench-sweep", 1


@dataclass(frozen=True)
class Shape:
    batch: int
    seq: int | None  # None: the evaluation texts at their own length, each call padded to its longest

    @property
    def label(self) -> str:
        return f"{self.batch} x {'own length' if self.seq is None else self.seq}"


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


def run_sweep(targets: list[Target], texts: list[str], cells: list[Shape], threads: list[int | None], *,
              max_length: int, rounds: int, warmup: int, max_calls: int, noise_threshold: float,
              peak_gflops: float | None = None, progress=None, notes: list[str] | None = None) -> list[dict]:
    engines, usable = {}, []
    for target in targets:
        try:
            engines.update({(target.key, n): target.open(n) for n in threads})
            usable.append(target)
        except Exception as exc:  # e.g. an INT8 graph a GPU provider cannot take: skip it, say why
            if not optional(target):
                raise
            (notes if notes is not None else []).append(f"{target.key}: skipped ({type(exc).__name__}: {exc})")
    targets = usable
    feeds = {(t.key, c): shape_feeds(t.folder, texts, c, max_length, max_calls) for t in targets for c in cells}
    folders = {t.key: t.folder for t in targets}
    flops = {key: call_flops(folders[key[0]], f) for key, f in feeds.items()}
    times: dict[tuple, list[float]] = defaultdict(list)
    round_p50: dict[tuple, list[float]] = defaultdict(list)
    for round_index in range(rounds):
        for n in threads:
            for target in targets if round_index % 2 == 0 else list(reversed(targets)):
                engine = engines[target.key, n]
                if hasattr(engine, "activate"):
                    engine.activate()
                time.sleep(SETTLE_SECONDS)
                for cell in cells:
                    calls = feeds[target.key, cell]
                    for feed in calls[:warmup]:
                        engine.run(feed)
                    block = _timed_calls(engine, calls)
                    times[target.key, n, cell] += block
                    round_p50[target.key, n, cell].append(float(np.median(block)) * 1e3)
                if progress:
                    progress.update(1)
    rows = []
    for target in targets:
        for n in threads:
            for cell in cells:
                seconds = np.asarray(times[target.key, n, cell])
                medians = round_p50[target.key, n, cell]
                spread = (max(medians) - min(medians)) / float(np.median(medians))
                cell_flops = flops[target.key, cell]
                row = {
                    "target": target.key, "artifact": getattr(target, "label", target.artifact.name),
                    "backend": target.backend,
                    "device": target.device, "precision": target.precision, "threads": n or 0,
                    "batch": cell.batch, "seq": cell.seq or "own", **latency_summary(list(seconds)),
                    "cv": round(float(seconds.std() / seconds.mean()), 4),
                    "round_p50_ms": [round(m, 4) for m in medians],
                    "round_spread": round(spread, 4),
                    "noisy": rounds > 1 and spread > noise_threshold,
                    "items_per_s": round(cell.batch * len(seconds) / float(seconds.sum()), 2),
                    "gflops_per_call": None, "achieved_gflops_per_s": None, "peak_fraction": None,
                }
                if cell_flops:
                    total = sum(cell_flops) * rounds
                    row["gflops_per_call"] = round(sum(cell_flops) / len(cell_flops) / 1e9, 4)
                    row["achieved_gflops_per_s"] = round(total / float(seconds.sum()) / 1e9, 2)
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
    checks = {}

    def available(kind: str) -> str | None:
        """None if ``kind`` can run here, else why not."""
        if kind not in checks:
            checks[kind] = _why_not(kind)
        return checks[kind]

    variants, notes = [], {}
    devices = {"pytorch": ["cuda"], "onnx": ["cuda", "tensorrt"], "openvino": ["gpu"]}
    for target in targets:
        for device in devices.get(target.backend, []):
            reason = available(f"{target.backend}-{device}")
            if reason is None:
                variants.append(Target(target.artifact, target.backend, device))
            else:
                notes[f"{target.backend}-{device}"] = f"{target.backend} on {device}: skipped ({reason})"
    return variants, sorted(notes.values())


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
    with tqdm(total=len(targets) * len(threads) * rounds, desc="benchmark blocks") as progress:
        rows = run_sweep(targets, texts, cells, threads, max_length=max_length, rounds=rounds, warmup=warmup,
                         max_calls=max_calls, noise_threshold=noise_threshold, peak_gflops=peak_gflops,
                         progress=progress, notes=notes)
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
    from edgetl.stages.evaluate import predict_logits

    logits = predict_logits(target.open(), load_tokenizer(target.folder, max_length), texts,
                            64 if target.batch_invariant else 1, desc=f"accuracy {target.key}")
    return round(float((logits.argmax(-1) == np.asarray(labels)).mean()), 5)
