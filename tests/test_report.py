"""`edgetl report` (one HTML page per run), the summary table at the end of `edgetl run`, and plots that read at a
glance: plain millisecond ticks, point labels that never overlap."""

from __future__ import annotations

import itertools
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, assert_readable, copy_run, edgetl_cli, manifests, visible_tick_labels
from edgetl.errors import UsageError

def _bench_row(artifact, backend, precision, p50, accuracy):
    return {"target": f"{backend}-{precision} ({artifact})", "artifact": artifact, "backend": backend,
            "precision": precision, "accuracy": accuracy, "p50_ms": p50, "p90_ms": p50 * 1.3, "p99_ms": p50 * 1.6,
            "throughput_per_s": 300.0, "model_mb": 23.0, "speedup_vs_pytorch_fp32": 6.41 / p50}


# The sst-int8 run of 3fee250: FP32 ONNX Runtime and OpenVINO at one accuracy, 0.9 ms apart, once printed as one.
SST_INT8 = {
    "title": "sst-int8", "metric": {"name": "accuracy", "scale": 100},
    "machine": {"cpu": "Intel(R) Xeon(R) Processor", "usable_cores": 2, "memory_gib": 23.5, "isa_flags": ["avx2"],
                "os": "Linux 6.18", "gpu": None},
    "settings": {"sentences": 872, "warmup": 20, "rounds": 2, "throughput_batch_size": 32, "threads": None},
    "rows": [_bench_row("01-finetune", "pytorch", "fp32", 6.41, 0.90826),
             _bench_row("02-export", "onnx", "fp32", 3.11, 0.90826),
             _bench_row("02-export", "openvino", "fp32", 4.02, 0.90826),
             _bench_row("03-quantize", "onnx", "int8", 2.04, 0.9094),
             _bench_row("03-quantize", "openvino", "int8", 2.73, 0.9094)],
}


def test_the_accuracy_latency_plot_has_plain_ms_ticks_and_labels_apart():
    from edgetl.bench.report import accuracy_latency_figure, pyplot

    fig = accuracy_latency_figure(SST_INT8)
    try:
        (ax,) = fig.axes
        assert len(ax.texts) == len(SST_INT8["rows"])
        assert_readable(ax)
    finally:
        pyplot().close(fig)


@pytest.mark.parametrize(("low", "high", "expected"), [
    (1.9, 7.0, ["2", "3", "4", "5", "6"]),
    (0.4, 600.0, ["1", "10", "100"]),
    (0.8, 30.0, ["1", "2", "5", "10", "20"]),
])
def test_log_ticks_are_plain_numbers_at_1_2_5_steps_or_finer(low, high, expected):
    from edgetl.bench.report import plain_log_ticks, pyplot

    fig, ax = pyplot().subplots()
    try:
        ax.set_xscale("log")
        ax.set_xlim(low, high)
        plain_log_ticks(ax.xaxis)
        fig.canvas.draw()
        assert visible_tick_labels(ax.xaxis) == expected
    finally:
        pyplot().close(fig)


def test_the_run_page_shows_every_stage_and_benchmarked_target_and_renders_in_chromium(tiny_run, tmp_path):
    run_dir = copy_run(tiny_run, tmp_path / "run")
    done = edgetl_cli("report", str(run_dir), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    page = run_dir / "report.html"
    assert done.stdout.strip() == f"wrote {page}"
    text = page.read_text()
    stages = list(manifests(run_dir))
    result = json.loads((run_dir / "05-benchmark" / "results.json").read_text())
    for stage in stages:
        assert f"<td>{stage}</td>" in text
    for row in result["rows"]:
        assert f"<td>{row['artifact']}</td>" in text and f"{row['p50_ms']:.2f}" in text
    assert text.count('src="data:image/png;base64,') == 1 and "Machine: " in text and "http" not in text

    cached = (Path.home() / ".cache" / "edgetl" / "chromium" / "bin" / "chromium").exists()
    on_path = any(shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome", "headless_shell"))
    if not (cached or on_path or (shutil.which("npm") and shutil.which("node"))):
        pytest.skip("no Chromium here and no npm to fetch one")
    rendered = subprocess.run([sys.executable, str(REPO / "benchmarks" / "render_html.py"), str(page),
                               "--png", str(tmp_path / "page.png")], capture_output=True, text=True, timeout=300)
    if rendered.returncode != 0 and "`npm install" in rendered.stderr:  # the registry, not the page
        pytest.skip(f"could not fetch Chromium from npm: {rendered.stderr[-300:]}")
    assert rendered.returncode == 0, rendered.stdout + rendered.stderr
    shown = json.loads(rendered.stdout)
    # A header row and a row per stage, then a header row and a row per benchmarked target.
    assert shown["table_rows"] == 1 + len(stages) + 1 + len(result["rows"])
    assert shown["images"] == 1 and shown["images_all_data_uri"] and not shown["images_broken"]
    assert not shown["png_blank"]


def test_the_page_goes_where_out_says(tiny_run, tmp_path):
    from edgetl.report import write_report

    assert write_report(tiny_run, tmp_path / "page.html") == tmp_path / "page.html"
    assert "<h1>edgetl run: " in (tmp_path / "page.html").read_text()
    assert not (tiny_run / "report.html").exists()


def test_a_folder_without_manifests_is_refused_in_one_line_naming_it(tmp_path, capsys):
    from edgetl.cli import main
    from edgetl.report import load_run

    (tmp_path / "01-finetune").mkdir()  # started, never finished
    with pytest.raises(UsageError, match=rf"^{re.escape(str(tmp_path))}: no stage folders with a manifest\.json"):
        load_run(tmp_path)
    assert main(["report", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"edgetl: error: {tmp_path / 'missing'}: no stage folders" in err
    assert not (tmp_path / "report.html").exists()


def test_edgetl_run_ends_with_a_table_of_stages_ran_or_reused(tiny_run, shrink, tmp_path, capsys, quiet_cwd):
    from edgetl.cli import main

    run_dir = copy_run(tiny_run, tmp_path / "run")
    assert main(["run", "sst-int8", *shrink(), "--run-dir", str(run_dir), "--from", "bundle"]) == 0
    lines = capsys.readouterr().out.splitlines()
    starts = [lines[0].index(heading) for heading in ("stage", "status", "wall time", "key metric")]
    rows = {cells[0]: cells[1:] for cells in ([line[a:b].strip() for a, b in itertools.pairwise([*starts, None])]
                                              for line in lines[1:-1])}
    assert list(rows) == list(manifests(run_dir))
    assert [status for status, _, _ in rows.values()] == ["reused"] * 5 + ["ran"]
    assert rows["01-finetune"][1].startswith("(") and rows["01-finetune"][2].startswith("accuracy 0.")
    assert re.fullmatch(r"onnx \d+\.\d MB", rows["03-quantize"][2])
    assert re.fullmatch(r"[\d.]+ s", rows["06-bundle"][1]), rows["06-bundle"]
    assert lines[-1].startswith("this run: ")


def test_durations_read_as_seconds_minutes_or_hours():
    from edgetl.report import duration

    assert [duration(s) for s in (4.66, 125, 3725)] == ["4.7 s", "2m05s", "1h02m"]
