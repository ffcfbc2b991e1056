"""Merge `edgetl bench` result files from several machines: one CSV, one table, two plots, one HTML page.

Each input is the ``results.json`` of one `edgetl bench` sweep or one recipe's benchmark stage (the same
result format; the stage's rows are batch 1 at own length), named in every output by its ``label``. The
table is for choosing hardware: per machine, the batch-1 own-length rows (what an interactive app
sees) come first, fastest first, then the other shapes.
"""

from __future__ import annotations

import base64
import csv
import html
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from edgetl.backends import BACKEND_LABELS
from edgetl.bench.machine import describe
from edgetl.bench.measure import RESULT_FORMAT, RESULT_FORMAT_V1, RESULT_VERSION
from edgetl.bench.report import _fmt, label_points, metric_of, plain_log_ticks, pyplot
from edgetl.errors import UsageError

MACHINE_COLUMNS = ("machine", "cpu", "cores", "isa")
HEADERS = ("machine", "model", "backend", "device", "precision", "threads", "batch", "seq", "accuracy %",
           "p50 ms", "p90 ms", "p99 ms", "IQR ms", "items/s", "GFLOP/s", "% of peak", "flag")
NUMERIC_COLUMNS = frozenset(HEADERS[8:16])  # accuracy % .. % of peak, right-aligned in HTML
NOISY_COLUMNS = frozenset({"p50 ms", "p90 ms", "p99 ms", "flag"})  # the cells a noisy flag puts in doubt
# Plot labels must stay short; the table carries the full backend names.
SHORT_BACKENDS = {"pytorch": "PT", "onnx": "ORT", "openvino": "OV"}
BACKEND_COLOURS = {"pytorch": "tab:orange", "onnx": "tab:blue", "openvino": "tab:purple"}


def load_results(paths: Iterable[str | Path]) -> list[dict]:
    """Read result files, refusing any that cannot be merged.

    Args:
        paths: ``results.json`` files written by ``edgetl bench`` or a recipe's ``benchmark`` stage.

    Returns:
        The parsed results, in the order given.

    Raises:
        UsageError: a file is missing, not JSON, not a result of a known format and version, or carries the
            machine label of an earlier file.
    """
    results, seen = [], {}
    for path in map(Path, paths):
        result = _read_result(path)
        label = result["label"]
        if label in seen:
            raise UsageError(f"{path} and {seen[label]} both carry the machine label {label!r}; "
                             f"pass a distinct --label to each `edgetl bench` run")
        seen[label] = path
        results.append(result)
    return results


def _read_result(path: Path) -> dict:
    if not path.is_file():
        raise UsageError(f"{path}: no such result file; pass the results.json of an `edgetl bench` run or a benchmark stage")
    try:
        result = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path} is not JSON ({exc}); pass the results.json of an `edgetl bench` run or a benchmark stage") from None
    found = (result.get("format"), result.get("format_version")) if isinstance(result, dict) else (None, None)
    if found not in ((RESULT_FORMAT, RESULT_VERSION), RESULT_FORMAT_V1):
        hint = ("; a benchmark stage result written before result formats (timed in one process, no noise flags): "
                "rerun the stage" if found == (None, None) and isinstance(result, dict) and "rows" in result else "")
        raise UsageError(f"{path} is not a benchmark result of format {RESULT_FORMAT!r} version {RESULT_VERSION} "
                         f"(or format {RESULT_FORMAT_V1[0]!r} version {RESULT_FORMAT_V1[1]}, from older `edgetl bench` "
                         f"runs); found {found[0]!r} version {found[1]!r}{hint}")
    missing = [key for key in ("label", "machine", "rows") if key not in result]
    if missing:
        raise UsageError(f"{path} lacks {', '.join(missing)}; rerun `edgetl bench` or the benchmark stage to write it again")
    return result


def merge(results: list[dict], out_dir: str | Path) -> dict[str, Path]:
    """Write merged.csv, merged.md, pareto.png, throughput_vs_batch.png and merged.html into ``out_dir``.

    Args:
        results: results with distinct labels, as ``load_results`` returns them.
        out_dir: folder to write into (created if missing).

    Returns:
        The paths written, keyed ``csv``, ``markdown``, ``pareto``, ``throughput`` and ``html``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out_dir / "merged.csv", "markdown": out_dir / "merged.md", "pareto": out_dir / "pareto.png",
             "throughput": out_dir / "throughput_vs_batch.png", "html": out_dir / "merged.html"}
    write_csv(results, paths["csv"])
    paths["markdown"].write_text(markdown(results))
    plot_pareto(results, paths["pareto"])
    plot_throughput(results, paths["throughput"])
    paths["html"].write_text(html_page(results, paths["pareto"], paths["throughput"]))
    return paths


def write_csv(results: list[dict], path: Path) -> None:
    """Every input row, with its machine's label, CPU, usable cores and ISA flags in front."""
    rows = []
    for result in results:
        machine = result["machine"]
        front = {"machine": result["label"], "cpu": machine.get("cpu"), "cores": machine.get("usable_cores"),
                 "isa": " ".join(machine.get("isa_flags") or [])}
        for row in result["rows"]:
            rows.append({**front, **{k: " ".join(map(str, v)) if isinstance(v, list) else v
                                     for k, v in row.items()}})
    # The union of row keys, not a fixed list: a field a newer sweep adds still reaches the CSV.
    fields = list(dict.fromkeys([*MACHINE_COLUMNS, *(key for row in rows for key in row)]))
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def _model(row: dict) -> str:
    return row.get("peer") or row.get("artifact") or row["target"]


def _score(result: dict, row: dict) -> float | None:
    """The row's task metric on a 0-100 scale (accuracy in a sweep, the task's metric in a stage result)."""
    name, scale = metric_of(result)
    return None if row.get(name) is None else row[name] * scale


def _is_headline(row: dict) -> bool:
    return row["batch"] == 1 and row["seq"] == "own"


def _ordered(rows: list[dict]) -> list[dict]:
    """Batch-1 own-length rows by p50 first, then the other shapes by batch, length and p50."""
    def p50(row: dict) -> float:
        return float("inf") if row.get("p50_ms") is None else row["p50_ms"]

    def shape(row: dict) -> tuple:
        return (row["batch"], -1 if row["seq"] == "own" else row["seq"])

    return (sorted((r for r in rows if _is_headline(r)), key=p50)
            + sorted((r for r in rows if not _is_headline(r)), key=lambda r: (*shape(r), p50(r))))


def table_rows(results: list[dict]) -> list[tuple[list[str], bool]]:
    """The hardware-selection table as (cells in ``HEADERS`` order, noisy) pairs, machine by machine."""
    table = []
    for result in results:
        for r in _ordered(result["rows"]):
            cells = [result["label"], _model(r), BACKEND_LABELS.get(r["backend"], r["backend"]), r["device"],
                     r["precision"].upper(), str(r["threads"] or "default"), str(r["batch"]), str(r["seq"]),
                     _fmt(_score(result, r), "{:.2f}"), _fmt(r.get("p50_ms"), "{:.2f}"),
                     _fmt(r.get("p90_ms"), "{:.2f}"), _fmt(r.get("p99_ms"), "{:.2f}"),
                     _fmt(r.get("iqr_ms"), "{:.2f}"), _fmt(r.get("items_per_s"), "{:.1f}"),
                     _fmt(r.get("achieved_gflops_per_s"), "{:.1f}"), _fmt(r.get("peak_fraction"), "{:.1f}", 100),
                     "noisy" if r.get("noisy") else ""]
            table.append((cells, bool(r.get("noisy"))))
    return table


def peers_table(result: dict) -> str:
    """An `edgetl bench` result as one table: batch 1 over the texts at their own length, at the most threads
    measured, throughput at the largest batch, accuracy on the same texts, speed-up against PyTorch FP32 eager
    of the same run; INT8 first."""
    own = [r for r in result["rows"] if r["seq"] == "own" and r["device"] == "cpu"]
    threads = max(r["threads"] or 0 for r in own)
    own = [r for r in own if (r["threads"] or 0) == threads]
    largest = max(r["batch"] for r in own)
    single = {r["target"]: r for r in own if r["batch"] == 1}
    batched = {r["target"]: r for r in own if r["batch"] == largest}
    reference = next((r for r in single.values() if r["backend"] == "pytorch" and r["precision"] == "fp32"), None)
    settings = result["settings"]
    lines = [f"Measured on {describe(result['machine'])}, {threads or 'default'} threads: batch 1 over "
             f"{settings['texts']} evaluation texts at their own length (up to {settings['max_calls']} calls a "
             f"round), {settings['rounds']} rounds each in its own process, `noisy` where the rounds' medians spread "
             f"over {settings['noise_threshold']:.0%}; throughput at batch {largest}; accuracy on the same {settings['texts']} texts.", "",
             f"| model | backend | precision | accuracy | p50 ms | p99 ms | batch-{largest} /s | size MB | "
             "speed-up vs PyTorch FP32 |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in sorted(single.values(), key=lambda r: (r["precision"] != "int8", r["backend"], r["peer"] or "")):
        name = row["peer"] or (row["artifact"] if "PT2E" in row["artifact"] else f"edgetl {row['artifact']}")
        noisy = " (noisy)" if row["noisy"] or batched[row["target"]]["noisy"] else ""
        accuracy = "–" if row["accuracy"] is None else f"{row['accuracy']:.2%}"
        speedup = "–" if reference is None else f"{reference['p50_ms'] / row['p50_ms']:.2f}x"
        lines.append(f"| {name} | {BACKEND_LABELS.get(row['backend'], row['backend'])} | {row['precision'].upper()} | {accuracy} | "
                     f"{row['p50_ms']:.2f}{noisy} | {row['p99_ms']:.2f} | {batched[row['target']]['items_per_s']:.0f} | "
                     f"{row['model_mb']:.1f} | {speedup} |")
    return "\n".join(lines)


def machine_line(result: dict) -> str:
    """One line on where a result was measured: ``describe`` plus library versions and the noise rule."""
    machine = result["machine"]
    line = describe(machine)
    versions = machine.get("versions") or {}
    if versions:
        line += "; " + ", ".join(f"{name} {version}" for name, version in versions.items() if version)
    settings = result.get("settings") or {}
    if settings.get("rounds") and settings.get("noise_threshold") is not None:
        line += (f"; {settings['rounds']} rounds, noisy = round medians spread over "
                 f"{settings['noise_threshold']:.0%}")
    return line


def markdown(results: list[dict]) -> str:
    def cell(text: str) -> str:  # a label may hold | or HTML, which Markdown would take as markup
        return html.escape(text, quote=False).replace("|", "\\|")

    lines = ["# Benchmark across machines", "",
             "Per machine: batch 1 at the texts' own length first, fastest first; then the other shapes. "
             "`noisy`: the p50 did not repeat across rounds on that machine.", "",
             "| " + " | ".join(HEADERS) + " |", "|" + "---|" * 8 + "---:|" * 8 + "---|"]
    lines += ["| " + " | ".join(map(cell, cells)) + " |" for cells, _ in table_rows(results)]
    lines += ["", "## Machines", ""]
    for result in results:
        lines.append(f"- **{cell(result['label'])}** ({cell(str(result.get('title', '')))}): "
                     f"{cell(machine_line(result))}")
        lines += [f"  - note: {cell(note)}" for note in result.get("notes") or []]
    return "\n".join(lines) + "\n"


def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (latency, accuracy) points no other point beats: none is as fast and as accurate and better in one.

    Returns them sorted by latency (so accuracy rises along the list); equal points are all kept.
    """
    def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
        return a[0] <= b[0] and a[1] >= b[1] and a != b

    return sorted(p for p in points if not any(dominates(q, p) for q in points))


def _plain(text: str) -> str:
    """Text matplotlib shows as written: a pair of $ in a label would otherwise start TeX math."""
    return text.replace("$", r"\$")


def _threads(row: dict) -> str:
    return f"{row['threads']}t" if row["threads"] else "default threads"


def _point_label(row: dict, many_threads: bool) -> str:
    parts = [_model(row), SHORT_BACKENDS.get(row["backend"], row["backend"]), row["precision"].upper()]
    if row["device"] != "cpu":
        parts.append(row["device"])
    if many_threads:
        parts.append(_threads(row))
    return _plain(" ".join(parts))


def plot_pareto(results: list[dict], path: Path) -> None:
    fig = pareto_figure(results)
    fig.savefig(path, dpi=110)
    pyplot().close(fig)


def pareto_figure(results: list[dict]):
    """Accuracy vs batch-1 own-length p50, one panel per machine, each with its Pareto front as a step line."""
    plt = pyplot()
    columns = min(len(results), 3) or 1
    panel_rows = -(-len(results) // columns) or 1
    fig, axes = plt.subplots(panel_rows, columns, figsize=(max(5.5 * columns, 7), 4.2 * panel_rows), sharey=True,
                             squeeze=False)
    for ax in axes.flat[len(results):]:
        ax.set_visible(False)
    labelled = []
    for ax, result in zip(axes.flat, results, strict=False):
        rows = [r for r in result["rows"] if _is_headline(r) and _score(result, r) is not None
                and (r.get("p50_ms") or 0) > 0]
        many_threads = len({r["threads"] for r in rows}) > 1
        for r in rows:
            peer = r.get("peer") is not None
            colour = BACKEND_COLOURS.get(r["backend"], "tab:gray")
            ax.scatter(r["p50_ms"], _score(result, r), marker="D" if peer else "o", s=45, zorder=3,
                       facecolors="none" if peer else colour, edgecolors=colour)
        front = pareto_front([(r["p50_ms"], _score(result, r)) for r in rows])
        if front:
            ax.step(*zip(*front, strict=True), where="post", color="tab:green", alpha=0.7, label="Pareto front")
            ax.legend(fontsize=7, loc="best")
        ax.set_xscale("log")
        ax.margins(x=0.25, y=0.08)  # room for the labels of the slowest and most accurate points
        if rows:
            plain_log_ticks(ax.xaxis)
        labelled.append((ax, [(r["p50_ms"], _score(result, r)) for r in rows],
                         [_point_label(r, many_threads) for r in rows]))
        ax.set_title(_plain(result["label"]), fontsize=10)
        ax.set_xlabel("batch-1 p50 at own length (ms, log scale)")
        ax.grid(True, alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("accuracy (%)")
    fig.suptitle("Accuracy vs latency (hollow diamonds: peer models; colour: backend)", fontsize=11)
    fig.tight_layout()
    for ax, points, labels in labelled:
        label_points(ax, points, labels, fontsize=7, marker_size=45)
    return fig


def plot_throughput(results: list[dict], path: Path) -> None:
    """Items/s vs batch size at own length: one line per machine x model x backend x device x precision x threads."""
    plt = pyplot()
    lines: dict[tuple, list[tuple[int, float]]] = {}
    for result in results:
        for r in result["rows"]:
            if r["seq"] == "own" and r.get("items_per_s") is not None:
                key = (result["label"], _model(r), r["backend"], r["device"], r["precision"], _threads(r))
                lines.setdefault(key, []).append((r["batch"], r["items_per_s"]))
    fig, ax = plt.subplots(figsize=(8, 4.8))
    # Colours repeat after ten lines; a line style per machine keeps the machines apart.
    styles = {result["label"]: ("-", "--", ":", "-.")[index % 4] for index, result in enumerate(results)}
    for (label, model, backend, device, precision, threads), points in lines.items():
        name = f"{label}: {model} {SHORT_BACKENDS.get(backend, backend)} {precision.upper()}"
        name += ("" if device == "cpu" else f" {device}") + f" {threads}"
        ax.plot(*zip(*sorted(points), strict=True), marker="o", linestyle=styles[label], label=_plain(name))
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({batch for points in lines.values() for batch, _ in points}))
    ax.xaxis.set_major_formatter("{x:g}")
    ax.set_yscale("log")
    if lines:
        plain_log_ticks(ax.yaxis)
    ax.set_xlabel("batch size (log scale)")
    ax.set_ylabel("items/s at own length (log scale)")
    ax.set_title("Throughput vs batch size", fontsize=11)
    ax.grid(True, alpha=0.3)
    if lines:
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


PAGE_CSS = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;font-size:13px}th,td{border:1px solid #ccc;padding:3px 6px}
td.num{text-align:right}th{background:#eee}td.noisy{background:#ffd8a8;font-weight:bold}
img{max-width:100%}li{margin-bottom:.4em}"""


def _data_uri(png: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii")


def html_page(results: list[dict], pareto_png: Path, throughput_png: Path) -> str:
    """One self-contained page: inline CSS, both plots as data: URIs, the table, machines and their notes."""
    esc = html.escape
    body = []
    for cells, noisy in table_rows(results):
        tds = []
        for header, text in zip(HEADERS, cells, strict=True):
            classes = " ".join(name for name, applies in (("num", header in NUMERIC_COLUMNS),
                                                          ("noisy", noisy and header in NOISY_COLUMNS)) if applies)
            tds.append(f'<td class="{classes}">{esc(text)}</td>' if classes else f"<td>{esc(text)}</td>")
        body.append("<tr>" + "".join(tds) + "</tr>")
    machines = []
    for result in results:
        notes = "".join(f"<li>{esc(note)}</li>" for note in result.get("notes") or [])
        machines.append(f"<li><b>{esc(result['label'])}</b> ({esc(str(result.get('title', '')))}): "
                        f"{esc(machine_line(result))}" + (f"<ul>{notes}</ul>" if notes else "") + "</li>")
    return "\n".join([
        "<!DOCTYPE html>", '<html><head><meta charset="utf-8"><title>edgetl bench across machines</title>',
        f"<style>{PAGE_CSS}</style></head><body>", "<h1>Benchmark across machines</h1>",
        "<p>Per machine: batch 1 at the texts' own length first, fastest first; then the other shapes. "
        "Orange cells: <i>noisy</i>, the p50 did not repeat across rounds on that machine.</p>",
        "<table><thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in HEADERS) + "</tr></thead><tbody>",
        *body, "</tbody></table>", "<h2>Machines</h2>", "<ul>", *machines, "</ul>",
        "<h2>Accuracy vs latency</h2>", f'<img alt="accuracy vs batch-1 p50" src="{_data_uri(pareto_png)}">',
        "<h2>Throughput vs batch size</h2>",
        f'<img alt="items/s vs batch size" src="{_data_uri(throughput_png)}">', "</body></html>", ""])
