"""Merging `edgetl bench` results from several machines: CSV, Markdown, plots and one self-contained page.

Synthetic result files only (no models): two machines, a peer, a noisy cell, two batch sizes, two lengths,
and null fields where a sweep leaves them empty.
"""

from __future__ import annotations

import copy
import csv
import json
import re

import pytest

from conftest import assert_readable
from edgetl.bench.merge import load_results, merge, pareto_figure, pareto_front
from edgetl.errors import UsageError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _row(artifact, backend, precision, batch, seq, p50, accuracy, *, peer=None, noisy=False, threads=1):
    return {"target": f"{backend}-{precision} ({artifact})", "artifact": artifact, "backend": backend,
            "device": "cpu", "precision": precision, "peer": peer, "threads": threads, "batch": batch, "seq": seq,
            "p50_ms": p50, "p90_ms": p50 * 1.4, "p99_ms": p50 * 1.8, "mean_ms": p50 * 1.1, "iqr_ms": p50 * 0.3,
            "calls": 900, "cv": 0.3, "round_p50_ms": [p50, p50 * 1.02, p50 * 0.99], "round_spread": 0.03,
            "noisy": noisy, "items_per_s": batch * 1000 / p50, "gflops_per_call": 0.5 * batch,
            "achieved_gflops_per_s": 500 * batch / p50, "peak_fraction": None, "accuracy": accuracy,
            "model_mb": 23.0}


def _result(label, speed, noisy_target):
    rows = []
    for artifact, backend, precision, p50, accuracy in [
        ("01-finetune", "pytorch", "fp32", 9.0, 0.912), ("02-export", "onnx", "fp32", 5.0, 0.912),
        ("03-quantize", "onnx", "int8", 2.0, 0.899), ("03-quantize", "openvino", "int8", 1.6, 0.897),
    ]:
        for batch, seq in [(1, "own"), (32, "own"), (1, 128), (32, 128)]:
            rows.append(_row(artifact, backend, precision, batch, seq, p50 * speed * batch ** 0.6, accuracy,
                             noisy=(artifact, backend, batch, seq) == noisy_target))
    rows.append(_row("optimum-int8", "onnx", "int8", 1, "own", 2.5 * speed, 0.893, peer="Optimum default"))
    rows.append(_row("optimum-int8", "onnx", "int8", 32, "own", 30 * speed, 0.893, peer="Optimum default"))
    rows[0].update(accuracy=None, gflops_per_call=None, achieved_gflops_per_s=None, iqr_ms=None)
    return {"format": "edgetl-bench-sweep", "format_version": 1, "title": "runs/sst-int8", "label": label,
            "machine": {"cpu": "AMD EPYC 9R14", "arch": "x86_64", "logical_cores": 2, "physical_cores": 1,
                        "usable_cores": 2, "isa_flags": ["avx2", "avx512_vnni"], "memory_gib": 23.5,
                        "os": "Linux 6.8", "gpu": None,
                        "versions": {"onnxruntime": "1.23", "openvino": "2026.0", "torch": "2.13.0"}},
            "settings": {"rounds": 3, "warmup": 10, "max_calls": 300, "threads": [1], "batch_sizes": [1, 32],
                         "seq_lengths": ["own", 128], "noise_threshold": 0.1, "peak_gflops": None, "texts": 872},
            "notes": ["onnx on cuda: skipped (onnxruntime has no CUDAExecutionProvider)"], "rows": rows}


@pytest.fixture
def result_files(tmp_path):
    first = _result("1 thread <b>EPYC</b>", 1.0, ("03-quantize", "onnx", 1, "own"))
    second = _result("2 threads", 0.6, ("02-export", "onnx", 32, 128))
    paths = []
    for name, result in [("one.json", first), ("two.json", second)]:
        (tmp_path / name).write_text(json.dumps(result))
        paths.append(tmp_path / name)
    return paths, [first, second]


@pytest.fixture
def merged(result_files, tmp_path):
    paths, results = result_files
    written = merge(load_results(paths), tmp_path / "merged")
    return written, results


def _key(machine, row):
    return (machine, row["target"], str(row["threads"]), str(row["batch"]), str(row["seq"]), f"{row['p50_ms']}")


def test_csv_holds_every_row_with_its_machine(merged):
    written, results = merged
    with open(written["csv"], newline="") as handle:
        csv_rows = list(csv.DictReader(handle))
    expected = [_key(result["label"], row) for result in results for row in result["rows"]]
    assert sorted(_key(r["machine"], r) for r in csv_rows) == sorted(expected)
    assert {r["cpu"] for r in csv_rows} == {"AMD EPYC 9R14"}
    assert {r["isa"] for r in csv_rows} == {"avx2 avx512_vnni"} and {r["cores"] for r in csv_rows} == {"2"}


def test_markdown_has_a_row_per_input_row_and_marks_noisy(merged):
    written, results = merged
    text = written["markdown"].read_text()
    table = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| machine")]
    assert len(table) == sum(len(result["rows"]) for result in results)
    noisy = [line for line in table if line.rstrip(" |").endswith("noisy")]
    assert len(noisy) == 2
    assert any("1 thread &lt;b&gt;EPYC&lt;/b&gt;" in line and "| ONNX Runtime | cpu | INT8 | 1 | 1 | own |" in line
               for line in noisy)
    first_machine = [line for line in table if line.startswith("| 1 thread")]
    headline = first_machine[: sum(1 for r in results[0]["rows"] if r["batch"] == 1 and r["seq"] == "own")]
    assert all("| 1 | own |" in line for line in headline)
    p50s = [float(line.split(" | ")[9]) for line in headline]
    assert p50s == sorted(p50s)
    assert "Optimum default" in text and "CUDAExecutionProvider" in text and "avx512_vnni" in text


def test_html_is_self_contained_escaped_and_embeds_both_plots(merged):
    written, _ = merged
    page = written["html"].read_text()
    assert "http://" not in page and "https://" not in page
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) == 2 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert page.count('src="') == 2 and "<link" not in page and "<script" not in page
    assert "1 thread &lt;b&gt;EPYC&lt;/b&gt;" in page and "<b>EPYC</b>" not in page
    assert page.count('<td class="noisy">noisy</td>') == 2
    assert page.count("<tr>") == 2 * 18 + 1


def test_plots_are_png_files(merged):
    written, _ = merged
    for name in ("pareto", "throughput"):
        data = written[name].read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000


def test_pareto_panels_have_plain_ms_ticks_and_labels_apart(result_files):
    from edgetl.bench.report import pyplot

    _, results = result_files
    fig = pareto_figure(results)
    try:
        panels = [ax for ax in fig.axes if ax.get_visible() and ax.get_title()]
        assert len(panels) == 2
        for ax in panels:
            assert len(ax.texts) == 4  # the batch-1 own-length rows with an accuracy
            assert_readable(ax)
    finally:
        pyplot().close(fig)


def test_pareto_front_keeps_exactly_the_non_dominated_points():
    points = [(1.0, 80.0), (2.0, 85.0), (2.5, 84.0), (3.0, 85.0), (4.0, 90.0), (0.5, 70.0), (5.0, 89.0),
              (2.0, 85.0)]
    assert pareto_front(points) == [(0.5, 70.0), (1.0, 80.0), (2.0, 85.0), (2.0, 85.0), (4.0, 90.0)]
    assert pareto_front([]) == []


def test_duplicate_labels_are_refused_naming_the_file(result_files, tmp_path):
    paths, results = result_files
    copy_path = tmp_path / "again.json"
    copy_path.write_text(json.dumps(results[0]))
    with pytest.raises(UsageError, match=r"again\.json.*one\.json.*distinct --label"):
        load_results([paths[0], copy_path])


@pytest.mark.parametrize("content, problem", [
    (None, "no such result file"),
    ("{not json", "not JSON"),
    ({"format": "edgetl-bench", "format_version": 1}, "format 'edgetl-bench-sweep' version 1"),
    ({"format": "edgetl-bench-sweep", "format_version": 2}, "found 'edgetl-bench-sweep' version 2"),
    ({"format": None, "format_version": None}, "benchmark stage result written before result formats"),
])
def test_unmergeable_files_are_refused_naming_the_file(result_files, tmp_path, content, problem):
    paths, results = result_files
    bad = tmp_path / "bad.json"
    if content is not None:
        bad.write_text(content if isinstance(content, str) else json.dumps({**copy.deepcopy(results[1]), **content}))
    with pytest.raises(UsageError, match=rf"bad\.json.*{re.escape(problem)}"):
        load_results([paths[0], bad])
