"""`edgetl bench`: the sweep over backends x threads x shapes, noise flags, FLOPs, peers and GPU skips."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from conftest import edgetl_cli


@pytest.fixture(scope="module")
def sweep(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    done = edgetl_cli("bench", str(tiny_run), "--out", str(out), "--rounds", "2", "--warmup", "1", "--max-calls", "4",
                      "--batch-sizes", "1,4", "--seq-lengths", "own,16", "--threads", "1,2", "--label", "tiny <b>",
                      "--no-pt2e", cwd=out, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_every_target_threads_and_shape_has_a_row(sweep):
    _, result = sweep
    assert (result["format"], result["format_version"], result["label"]) == ("edgetl-bench", 2, "tiny <b>")
    targets = {r["target"] for r in result["rows"]}
    assert {"pytorch-fp32 (01-finetune)", "onnx-int8 (03-quantize)", "openvino-int8 (03-quantize)",
            "onnx-int8 (Optimum default)", "openvino-int8 (OpenVINO default)"} <= targets
    cells = {(r["target"], r["threads"], r["batch"], r["seq"]) for r in result["rows"]}
    assert len(cells) == len(result["rows"]) == len(targets) * 2 * 2 * 2
    for row in result["rows"]:
        assert row["calls"] == 2 * 4 and len(row["round_p50_ms"]) == 2 and row["p50_ms"] > 0
        assert row["items_per_s"] > 0 and 0 <= row["accuracy"] <= 1 and row["achieved_gflops_per_s"] > 0
        assert row["noisy"] == (row["round_spread"] > 0.10)
    peers = {r["peer"] for r in result["rows"]} - {None}
    assert peers == {"Optimum default", "OpenVINO default"}


@pytest.mark.slow
def test_without_a_gpu_each_gpu_backend_is_skipped_with_a_note(sweep):
    from edgetl.bench.machine import gpus

    _, result = sweep
    if gpus():
        pytest.skip("this machine has a GPU")
    assert all(r["device"] == "cpu" for r in result["rows"])
    notes = " ".join(result["notes"])
    for kind in ("pytorch on cuda", "onnx on cuda", "onnx on tensorrt", "openvino on gpu"):
        assert f"{kind}: skipped" in notes


@pytest.mark.slow
def test_the_run_writes_its_reports(sweep):
    out, result = sweep
    for name in ("merged.md", "merged.csv", "merged.html", "pareto.png", "throughput_vs_batch.png"):
        assert (out / name).stat().st_size > 0, name
    assert result["machine"]["usable_cores"] >= 1 and result["machine"]["versions"]["onnxruntime"]


def test_only_gpu_without_a_gpu_writes_notes_and_no_rows(tiny_run, tmp_path):
    from edgetl.bench.machine import gpus

    if gpus():
        pytest.skip("this machine has a GPU")
    done = edgetl_cli("bench", str(tiny_run / "06-bundle"), "--only-gpu", "--out", str(tmp_path), "--rounds", "1",
                      cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["rows"] == [] and any("onnx on cuda: skipped" in n for n in result["notes"])


@pytest.mark.parametrize("option, value, message", [
    ("--batch-sizes", "1,0", "--batch-sizes: '0' is not a positive integer"),
    ("--seq-lengths", "own,long", "--seq-lengths: 'long' is not a positive integer or own"),
    ("--threads", "two", "--threads: 'two' is not a positive integer"),
])
def test_bad_sweep_options_are_named(tiny_run, tmp_path, option, value, message):
    done = edgetl_cli("bench", str(tiny_run), option, value, "--out", str(tmp_path), cwd=tmp_path)
    assert done.returncode != 0 and message in done.stderr


def test_fixed_lengths_pad_every_call_and_own_lengths_do_not(tiny_run, dev_texts):
    from edgetl.bench.measure import Shape, shape_feeds

    folder = tiny_run / "02-export" / "onnx"
    fixed = shape_feeds(folder, dev_texts, Shape(4, 24), max_length=64, max_calls=5)
    assert len(fixed) == 5 and all(f["input_ids"].shape == (4, 24) for f in fixed)
    assert all(f["attention_mask"].sum() < f["attention_mask"].size for f in fixed)  # padding, not more text
    own = shape_feeds(folder, dev_texts, Shape(1, None), max_length=64, max_calls=1000)
    assert len(own) == len(dev_texts) and len({f["input_ids"].shape[1] for f in own}) > 3
    assert all(f["attention_mask"].all() for f in own)


def test_flops_from_the_config_match_the_torch_count_of_a_pruned_model():
    from transformers import BertConfig

    from edgetl.architectures.flops import encoder_flops
    from edgetl.modeling import MeanPoolBertForSequenceClassification, flops_per_text
    from edgetl.pruning import PrunePlan, apply_plan

    hidden, layers, heads, ffn = 32, 3, 4, 64
    model = MeanPoolBertForSequenceClassification(BertConfig(
        vocab_size=120, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=ffn, max_position_embeddings=64, num_labels=2))
    config = model.config.to_dict()
    per_layer = 2 * (4 * hidden * hidden + 2 * hidden * ffn) * 10 + 2 * 2 * hidden * 10 * 10
    assert encoder_flops(config, [10]) == layers * per_layer + 2 * hidden * 2
    apply_plan(model, PrunePlan(heads=[[0, 1]] * layers, neurons=[list(range(16))] * layers, drop_layers=[]))
    pruned = model.config.to_dict()
    assert pruned["edgetl_layers"][0] == {"heads": 2, "intermediate": 16}
    assert encoder_flops(pruned, [7, 12]) == flops_per_text(model, [7, 12]) < encoder_flops(config, [7, 12])


@dataclass(frozen=True)
class _SleepyTarget:
    """A stand-in target whose calls take ``ms[i]`` milliseconds in round i (the i-th time it is opened)."""

    key: str
    ms: tuple
    opened: list = field(default_factory=list)

    backend, device, precision, folder = "onnx", "cpu", "int8", "."

    @property
    def artifact(self):
        return type("A", (), {"name": self.key})()

    def open(self, threads, task=None):
        self.opened.append(threads)
        delay = self.ms[len(self.opened) - 1] / 1e3

        class Engine:
            def run(self, feed):
                time.sleep(delay)
        return Engine()


def test_a_cell_whose_rounds_disagree_is_flagged_noisy(monkeypatch):
    from edgetl.bench import measure

    feeds = [{"input_ids": np.zeros((1, 8), dtype=np.int64)}] * 4
    monkeypatch.setattr(measure, "shape_feeds", lambda *args, **kwargs: feeds)
    monkeypatch.setattr(measure, "SETTLE_SECONDS", 0)
    # Rounds of 10 ms calls, one round at 20 ms; the threshold leaves room for a busy machine's sleep overshoot.
    steady, jumpy = _SleepyTarget("steady", (10, 10, 10)), _SleepyTarget("jumpy", (10, 20, 10))
    rows = measure.measure([steady, jumpy], ["x"], [measure.Shape(1, None)], [None], max_length=8, rounds=3,
                           warmup=2, max_calls=4, noise_threshold=0.5, isolate=False)
    by_target = {r["target"]: r for r in rows}
    assert not by_target["steady"]["noisy"] and by_target["jumpy"]["noisy"]
    assert by_target["jumpy"]["round_spread"] > 0.5 and by_target["steady"]["gflops_per_call"] is None
    assert len(steady.opened) == 3  # every round opens its engines afresh


def test_gpu_variants_name_their_device_where_one_is_present(tiny_artifacts, monkeypatch):
    from edgetl.backends import targets_of
    from edgetl.bench import sweep

    cpu = targets_of([tiny_artifacts["finetune"], tiny_artifacts["quantize"]])
    monkeypatch.setattr(sweep, "_why_not", lambda kind: None if kind != "openvino-gpu" else "no GPU device")
    variants, notes = sweep.gpu_variants(cpu)
    assert sorted(t.key for t in variants) == ["onnx-int8 [cuda] (03-quantize)", "onnx-int8 [tensorrt] (03-quantize)",
                                               "pytorch-fp16 [cuda] (01-finetune)"]
    assert notes == ["openvino on gpu: skipped (no GPU device)"]


@pytest.mark.slow
def test_the_benchmark_stage_writes_the_same_format_and_merges_with_a_sweep(sweep, tiny_run, tmp_path):
    import html

    from edgetl.bench.merge import load_results, merge

    out, swept = sweep
    stage_file = tiny_run / "05-benchmark" / "results.json"
    stage = json.loads(stage_file.read_text())
    assert (stage["format"], stage["format_version"]) == (swept["format"], swept["format_version"])
    for row in stage["rows"]:  # the engine's batch-1 own-length cell, with the stage's columns beside it
        assert (row["batch"], row["seq"]) == (1, "own") and isinstance(row["noisy"], bool)
        assert set(swept["rows"][0]) - {"peer"} <= set(row)
    written = merge(load_results([stage_file, out / "results.json"]), tmp_path / "merged")
    table = written["markdown"].read_text()
    label = html.escape(stage["label"], quote=False).replace("|", "\\|")
    assert f"| {label} | 01-finetune |" in table and "| tiny &lt;b&gt; | 01-finetune |" in table
    machines = [line for line in written["csv"].read_text().splitlines()[1:] if line]
    assert len(machines) == len(stage["rows"]) + len(swept["rows"])


@pytest.mark.slow
def test_the_report_page_renders_in_headless_chromium(sweep, tmp_path):
    """benchmarks/render_html.py: Chromium from PATH, its cache, or the npm registry (@sparticuz/chromium)."""
    import shutil
    import subprocess
    import sys

    from conftest import REPO

    cached = (Path.home() / ".cache" / "edgetl" / "chromium" / "bin" / "chromium").exists()
    on_path = any(shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome", "headless_shell"))
    if not (cached or on_path or (shutil.which("npm") and shutil.which("node"))):
        pytest.skip("no Chromium here and no npm to fetch one")
    out, result = sweep
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "render_html.py"), str(out / "merged.html"),
                           "--png", str(tmp_path / "page.png")], capture_output=True, text=True, timeout=300)
    if done.returncode != 0 and "`npm install" in done.stderr:  # the registry, not the page
        pytest.skip(f"could not fetch Chromium from npm: {done.stderr[-300:]}")
    assert done.returncode == 0, done.stdout + done.stderr
    page = json.loads(done.stdout)
    assert page["table_rows"] > len(result["rows"]) and page["images"] == 2 and page["images_all_data_uri"]
    assert not page["png_blank"] and not page["images_broken"] and (tmp_path / "page.png").stat().st_size > 10_000


@pytest.mark.slow
def test_neural_compressor_pt2e_int8_quantizes_and_stays_close_to_fp32(tiny_artifacts, dev_texts):
    from edgetl.backends import Target
    from edgetl.bench.pt2e import pt2e_variants
    from edgetl.runtime.text import encode, load_tokenizer

    fp32 = Target(tiny_artifacts["finetune"], "pytorch")
    (int8,) = pt2e_variants([fp32, Target(tiny_artifacts["export"], "onnx")], dev_texts, max_length=64)
    assert int8.key == "pytorch-int8 [inc-pt2e] (01-finetune)" and int8.precision == "int8"
    feeds = encode(load_tokenizer(fp32.folder, 64), dev_texts[:32])
    reference, quantized = fp32.open().run(feeds), int8.open().run(feeds)
    assert not np.array_equal(reference, quantized), "no INT8 arithmetic happened"
    assert np.corrcoef(reference.ravel(), quantized.ravel())[0, 1] > 0.98
