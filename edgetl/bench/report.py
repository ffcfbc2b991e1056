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


def table(rows: list[dict], metric: tuple[str, float] = ("accuracy", 100), throughput_batch: int = 32,
          ) -> tuple[list[str], list[list[str]]]:
    """The benchmark table as headers and formatted cells, one list per row (report.md and `edgetl report`)."""
    name, scale = metric
    headers = ["model", "backend", "precision", _heading(name, scale), "p50 ms", "p90 ms", "p99 ms",
               f"batch-{throughput_batch} /s", "size MB", "peak RSS MB", "speed-up", "flag"]
    cells = [[r["artifact"], BACKEND_LABELS.get(r["backend"], r["backend"]), r["precision"].upper(),
              _fmt(r.get(name), "{:.2f}", scale), f"{r['p50_ms']:.2f}", f"{r['p90_ms']:.2f}", f"{r['p99_ms']:.2f}",
              f"{r['throughput_per_s']:.0f}", f"{r['model_mb']:.1f}", _fmt(r.get("peak_rss_mb"), "{:.0f}"),
              _fmt(r.get("speedup_vs_pytorch_fp32"), "{:.2f}x"), "noisy" if r.get("noisy") else ""] for r in rows]
    return headers, cells


def markdown_table(rows: list[dict], metric: tuple[str, float] = ("accuracy", 100)) -> str:
    headers, cells = table(rows, metric)
    lines = ["| " + " | ".join(headers) + " |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in cells)])


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


def pyplot():
    """matplotlib's pyplot on the Agg backend: plots are written to files, never shown."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plain_log_ticks(axis, most: int = 8) -> None:
    """Ticks on a log axis as plain numbers (2, 3, 5 rather than 2x10^0) at 1-2-5 steps, or finer where the
    view spans less than a decade, or at whole decades where it spans many. Call once the limits are final."""
    import math

    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    low, high = sorted(axis.get_view_interval())
    decades = range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
    for mantissas in ((1, 2, 3, 4, 5, 6, 8), (1, 2, 5), (1,)):
        ticks = [m * 10.0**d for d in decades for m in mantissas if low <= m * 10.0**d <= high]
        if len(ticks) <= most:
            break
    if len(ticks) < 2:  # a view narrower than 1-2-3-4-5-6-8 steps: one round tick in the middle
        ticks = [float(f"{math.sqrt(low * high):.2g}")]
    axis.set_major_locator(FixedLocator(ticks))
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(NullFormatter())


# Where a label may sit beside its point, in points: (dx, dy, horizontal, vertical alignment), nearest first.
LABEL_OFFSETS = [(dx * far, dy * far, ha, va) for far in (1, 2.5)
                 for dx, dy, ha, va in ((6, 4, "left", "bottom"), (6, -4, "left", "top"), (-6, 4, "right", "bottom"),
                                        (-6, -4, "right", "top"), (0, 7, "center", "bottom"),
                                        (0, -7, "center", "top"))]


def _overlap(a, b) -> float:
    return max(min(a.x1, b.x1) - max(a.x0, b.x0), 0) * max(min(a.y1, b.y1) - max(a.y0, b.y0), 0)


def label_points(ax, points: list[tuple[float, float]], labels: list[str], fontsize: float = 8,
                 marker_size: float = 60) -> list:
    """Label each data point where its text overlaps no earlier label and no marker and stays inside the axes;
    where no offset is free, where it overlaps least. Call after the limits and the layout are final.

    Returns the text objects, in the order of ``points``.
    """
    renderer = ax.figure.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    radius = marker_size**0.5 / 2 * ax.figure.dpi / 72  # a marker's half-width in pixels
    from matplotlib.transforms import Bbox

    taken = [Bbox.from_extents(x - radius, y - radius, x + radius, y + radius)
             for x, y in ax.transData.transform(points)] if points else []
    texts = []
    for point, label in zip(points, labels, strict=True):
        best = None
        for dx, dy, ha, va in LABEL_OFFSETS:
            text = ax.annotate(label, point, textcoords="offset points", xytext=(dx, dy), ha=ha, va=va,
                               fontsize=fontsize)
            box = text.get_window_extent(renderer)
            padded = box.padded(2)  # a gap between neighbours, so two labels never read as one
            cost = sum(_overlap(padded, other) for other in taken) + box.width * box.height - _overlap(box, frame)
            if best is not None and cost >= best[0]:
                text.remove()
                continue
            if best is not None:
                best[1].remove()
            best = (cost, text, padded)
            if cost == 0:
                break
        taken.append(best[2])
        texts.append(best[1])
    return texts


def accuracy_latency_figure(result: dict):
    """The task metric against batch-1 p50 latency, one labelled point per row that has a score."""
    plt = pyplot()
    name, scale = metric_of(result)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    rows = [r for r in result["rows"] if r.get(name) is not None]
    for r in rows:
        marker = "o" if r["precision"] == "fp32" else "s"
        ax.scatter(r["p50_ms"], r[name] * scale, marker=marker, s=60)
    ax.set_xscale("log")
    ax.margins(x=0.15, y=0.15)  # room for the labels of the outermost points
    ax.set_xlabel("batch-1 p50 latency (ms, log scale)")
    ax.set_ylabel(_heading(name, scale))
    ax.set_title(f"{name} vs latency (circles: FP32; squares: reduced precision)", fontsize=11)
    fig.text(0.5, 0.005, describe(result["machine"]), ha="center", fontsize=6.5, wrap=True)
    ax.grid(True, alpha=0.3)
    if rows:
        plain_log_ticks(ax.xaxis)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    several = len({r["artifact"] for r in rows}) > 1  # then a label says which model, not only which runtime
    label_points(ax, [(r["p50_ms"], r[name] * scale) for r in rows],
                 [(f"{r['artifact']}: " if several else "") +
                  f"{BACKEND_LABELS.get(r['backend'], r['backend'])} {r['precision'].upper()}" for r in rows])
    return fig


def plot(result: dict, path: Path) -> None:
    fig = accuracy_latency_figure(result)
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
