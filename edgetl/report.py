"""What a run did, read back from its manifests: a summary table for `edgetl run` and one self-contained HTML page
(`edgetl report`) with each stage's wall time and output, the benchmark table and plot, and the machine."""

from __future__ import annotations

import base64
import html
import io
import time
from pathlib import Path

from edgetl.artifact import Artifact
from edgetl.bench.machine import describe
from edgetl.bench.merge import PAGE_CSS
from edgetl.bench.report import accuracy_latency_figure, metric_of, pyplot, table
from edgetl.errors import UsageError

# Kinds whose metrics are keyed by target, earliest model first: the last one is the run's product.
PER_TARGET_KINDS = ("evaluation", "benchmark")


def load_run(run_dir: str | Path) -> list[Artifact]:
    """The finished stage folders (``NN-stage/manifest.json``) of a run, in stage order."""
    run_dir = Path(run_dir)
    folders = sorted(p.parent for p in run_dir.glob("[0-9][0-9]-*/manifest.json"))
    if not folders:
        raise UsageError(f"{run_dir}: no stage folders with a manifest.json; give a run folder written by `edgetl run`")
    return [Artifact.load(folder) for folder in folders]


def duration(seconds: float) -> str:
    """4.7 s, 2m05s, 1h03m."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


def _metric_text(name: str, value) -> str:
    if name.endswith("_bytes"):
        return f"{name.removesuffix('_bytes')} {value / 1e6:.1f} MB"
    return f"{name} {value:.4g}" if isinstance(value, float) else f"{name} {value}"


def metrics_text(artifact: Artifact) -> list[str]:
    """The artifact's scalar metrics (numbers and short words), formatted; nested ones are left to the manifest."""
    return [_metric_text(name, value) for name, value in artifact.metrics.items()
            if isinstance(value, (int, float, str)) and not isinstance(value, bool) and len(str(value)) <= 40]


def key_metric(artifact: Artifact) -> str:
    """The one metric a summary line shows: the first number, or the last model's for per-target metrics."""
    numbers = [(name, value) for name, value in artifact.metrics.items()
               if isinstance(value, (int, float)) and not isinstance(value, bool)]
    if not numbers:
        return ""
    return _metric_text(*(numbers[-1] if artifact.kind in PER_TARGET_KINDS else numbers[0]))


def _seconds(artifact: Artifact) -> float:
    return artifact.manifest.get("timings", {}).get("seconds", 0.0)


def run_summary(artifacts: list[Artifact], since: float) -> str:
    """A plain-text table of stages: ran (started at or after ``since``, a Unix time) or reused, wall time, key
    metric; readable in a terminal and in a CI log alike."""
    rows, reused = [("stage", "status", "wall time", "key metric")], False
    for artifact in artifacts:
        ran = artifact.manifest.get("timings", {}).get("started_unix", 0) >= since - 1e-3  # manifests round to ms
        reused = reused or not ran
        wall = duration(_seconds(artifact))
        rows.append((artifact.path.name, "ran" if ran else "reused", wall if ran else f"({wall})",
                     key_metric(artifact)))
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.append(f"this run: {duration(time.time() - since)}"
                 + ("; (wall time) of a reused stage: as recorded when it ran" if reused else ""))
    return "\n".join(lines)


def _png_uri(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    pyplot().close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _table(headers: list[str], rows: list[list[str]], numeric: set[int]) -> list[str]:
    esc = html.escape
    lines = ["<table><thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in headers) + "</tr></thead><tbody>"]
    for row in rows:
        lines.append("<tr>" + "".join(f'<td class="num">{esc(c)}</td>' if i in numeric else f"<td>{esc(c)}</td>"
                                      for i, c in enumerate(row)) + "</tr>")
    return [*lines, "</tbody></table>"]


def _stage_rows(artifacts: list[Artifact]) -> list[list[str]]:
    rows = []
    for a in artifacts:
        started = a.manifest.get("timings", {}).get("started_unix")
        size = sum(f.get("bytes", 0) for f in a.manifest.get("files", {}).values()) / 1e6
        rows.append([a.path.name, a.kind, a.manifest.get("precision") or "", duration(_seconds(a)),
                     time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)) if started else "", f"{size:.1f}",
                     "; ".join(metrics_text(a))])
    return rows


def _benchmark_section(artifact: Artifact) -> list[str]:
    import json

    path = artifact.path / "results.json"
    if not path.is_file():
        return [f"<h2>Benchmark: {html.escape(artifact.path.name)}</h2>", "<p>No results.json in this folder.</p>"]
    result = json.loads(path.read_text())
    name, scale = metric_of(result)
    headers, rows = table(result["rows"], (name, scale), result["settings"]["throughput_batch_size"])
    scored = any(r.get(name) is not None for r in result["rows"])
    plot = (f'<img alt="{html.escape(name)} vs batch-1 p50 latency" src="{_png_uri(accuracy_latency_figure(result))}">'
            if scored else f"<p>No {html.escape(name)} was measured, so there is no plot.</p>")
    return [f"<h2>Benchmark: {html.escape(artifact.path.name)}</h2>",
            "<p>Batch-1 latency on the evaluation texts at their own length; speed-up = PyTorch FP32 p50 / this p50, "
            "same run.</p>", *_table(headers, rows, set(range(3, 11))), plot,
            f"<p>Machine: {html.escape(describe(result['machine']))}</p>"]


def html_page(run_dir: Path, artifacts: list[Artifact]) -> str:
    """One self-contained page: inline CSS, plots as data: URIs, no scripts."""
    versions = artifacts[-1].manifest.get("versions") or {}
    code = f"edgetl {versions.get('edgetl', '?')}" + (f" ({versions['edgetl_commit'][:10]})"
                                                      if versions.get("edgetl_commit") else "")
    total = duration(sum(_seconds(a) for a in artifacts))
    benchmarks = [a for a in artifacts if a.kind == "benchmark"]
    body = [line for a in benchmarks for line in _benchmark_section(a)] or [
        "<h2>Benchmark</h2>", "<p>This run has no benchmark stage, so no latency was measured and no machine "
        "was recorded.</p>"]
    headers = ["stage", "kind", "precision", "wall time", "started", "size MB", "metrics"]
    return "\n".join([
        "<!DOCTYPE html>", f'<html><head><meta charset="utf-8"><title>edgetl run {html.escape(run_dir.name)}</title>',
        f"<style>{PAGE_CSS}</style></head><body>", f"<h1>edgetl run: {html.escape(run_dir.name)}</h1>",
        f"<p>{html.escape(str(run_dir.resolve()))}: {len(artifacts)} stages, {total} of stage wall time; "
        f"{html.escape(code)}.</p>", "<h2>Stages</h2>", *_table(headers, _stage_rows(artifacts), {3, 5}),
        *body, "</body></html>", ""])


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the run's HTML page to ``out`` (default ``RUN_DIR/report.html``) and return its path."""
    run_dir = Path(run_dir)
    artifacts = load_run(run_dir)
    out = Path(out) if out else run_dir / "report.html"
    out.write_text(html_page(run_dir, artifacts), encoding="utf-8")
    return out
