"""Reporting: results.json, results.csv, report.md and an accuracy-vs-latency plot."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from edgetl.backends import BACKEND_LABELS
from edgetl.bench.machine import describe

COLUMNS = ("target", "backend", "precision", "p50_ms", "p90_ms", "p99_ms", "iqr_ms",
           "throughput_per_s", "model_mb", "peak_rss_mb", "speedup_vs_pytorch_fp32")


def add_ratios(rows: list[dict]) -> None:
    """Speed-up of each row's batch-1 p50 against PyTorch FP32 eager of the same run (ratios survive noise)."""
    reference = next((r for r in rows if r["backend"] == "pytorch" and r["precision"] == "fp32"), None)
    for row in rows:
        row["speedup_vs_pytorch_fp32"] = round(reference["p50_ms"] / row["p50_ms"], 2) if reference else None


CLASSIFICATION_METRIC = {"name": "accuracy", "scale": 100}  # what results written before tasks measured


def metric_of(result: dict) -> tuple[str, float]:
    """The name of the task metric a result's rows hold, and the factor that puts it on a 0-100 scale."""
    metric = result.get("metric", CLASSIFICATION_METRIC)
    return metric["name"], metric["scale"]


def write_reports(result: dict, out_dir: Path) -> None:
    rows, (name, _) = result["rows"], metric_of(result)
    (out_dir / "results.json").write_text(json.dumps(result, indent=1))
    with open(out_dir / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=(*COLUMNS[:3], name, *COLUMNS[3:]), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (out_dir / "report.md").write_text(markdown(result))
    plot(result, out_dir / f"{name}_vs_latency.png")


def _fmt(value, pattern: str, scale: float = 1) -> str:
    return "–" if value is None else pattern.format(value * scale)


def _heading(name: str, scale: float) -> str:
    return f"{name} %" if scale == 100 else f"{name} (x{100 / scale:g})"


def markdown_table(rows: list[dict], metric: tuple[str, float] = ("accuracy", 100)) -> str:
    name, scale = metric
    lines = [
        f"| model | backend | precision | {_heading(name, scale)} | p50 ms | p90 ms | p99 ms | batch-32 /s | size MB | peak RSS MB | speed-up | flag |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['artifact']} | {BACKEND_LABELS.get(r['backend'], r['backend'])} | {r['precision'].upper()} | "
            f"{_fmt(r.get(name), '{:.2f}', scale)} | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} | {r['p99_ms']:.2f} | "
            f"{r['throughput_per_s']:.0f} | {r['model_mb']:.1f} | {_fmt(r.get('peak_rss_mb'), '{:.0f}')} | "
            f"{_fmt(r.get('speedup_vs_pytorch_fp32'), '{:.2f}x')} | {'noisy' if r.get('noisy') else ''} |"
        )
    return "\n".join(lines)


def markdown(result: dict) -> str:
    settings = result["settings"]
    return "\n".join([
        f"# Benchmark: {result.get('title', '')}",
        "",
        f"Machine: {describe(result['machine'])}",
        f"Sentences: {settings['sentences']} evaluation texts at their own length, batch 1 "
        f"({settings['warmup']} warm-up calls, {settings['rounds']} rounds, each in a fresh process, target order "
        f"alternating); throughput at batch {settings['throughput_batch_size']}; threads: {settings['threads'] or 'default'}. "
        f"noisy: the per-round p50s spread by more than {settings['noise_threshold']:.0%} of their median.",
        f"{metric_of(result)[0]} on the full evaluation split; speed-up = PyTorch FP32 eager p50 / this p50, same run.",
        "",
        markdown_table(result["rows"], metric_of(result)),
        "",
    ])


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name, scale = metric_of(result)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in result["rows"]:
        if r.get(name) is None:
            continue
        marker = "o" if r["precision"] == "fp32" else "s"
        ax.scatter(r["p50_ms"], r[name] * scale, marker=marker, s=60)
        ax.annotate(f"{BACKEND_LABELS.get(r['backend'], r['backend'])} {r['precision'].upper()}",
                    (r["p50_ms"], r[name] * scale), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("batch-1 p50 latency (ms, log scale)")
    ax.set_ylabel(_heading(name, scale))
    ax.set_title(f"{name} vs latency", fontsize=11)
    fig.text(0.5, 0.005, describe(result["machine"]), ha="center", fontsize=6.5, wrap=True)
    ax.grid(True, alpha=0.3)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
