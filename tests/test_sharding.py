"""``edgetl shard``: a bundle's models cut at layer boundaries run as a pipeline of worker processes and answer as the
whole model does (FP32 within 1e-5, INT8 as its own graph), for 2 and 3 parts, on both backends."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal

import numpy as np
import pytest

from conftest import edgetl_cli, write_tiny_bundle
from edgetl.errors import ArtifactError, OutOfMemoryError, UsageError

TEXTS = ["a gorgeous , witty film", "dull and lifeless " * 40, "fine", "the battery died after two days"] * 3


@pytest.fixture(scope="module")
def deep_bundle(tmp_path_factory, tiny_model):
    """An FP32 text-classification bundle of a 4-layer tiny BERT (random weights), ONNX and OpenVINO."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig.from_pretrained(str(tiny_model), num_hidden_layers=4, num_labels=3)
    torch.manual_seed(0)
    model = BertForSequenceClassification(config).eval()
    folder = tmp_path_factory.mktemp("deep") / "bundle"
    return write_tiny_bundle(folder, model, "text-classification", ["a", "b", "c"], False, tiny_model, 64)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, deep_bundle):
    from edgetl.sharding import shard_bundle

    root = tmp_path_factory.mktemp("sharded")
    return {parts: (shard_bundle(deep_bundle, root / f"parts-{parts}", parts, log=lambda _: None), root / f"parts-{parts}")
            for parts in (2, 3)}


@pytest.mark.parametrize("parts", [2, 3])
@pytest.mark.parametrize("backend", ["onnx", "openvino"])
def test_a_sharded_fp32_model_answers_as_the_whole_one(deep_bundle, sharded, parts, backend):
    from edgetl.runtime import load
    from edgetl.runtime.pipeline import PipelineEngine

    models, folder = sharded[parts]
    entry = models[backend]
    assert len(entry["parts"]) == parts and entry["parts"][0]["layers"][0] == 0 and entry["parts"][-1]["layers"][1] == 4
    assert all(a["layers"][1] == b["layers"][0] for a, b in itertools.pairwise(entry["parts"]))
    assert not (folder / entry["sharded_from"]["path"]).exists()  # the whole model is not shipped beside its parts
    name = {"onnx": "onnxruntime", "openvino": "openvino"}[backend]
    whole = load(deep_bundle, backend=name).logits(TEXTS)
    runtime = load(folder, backend=name)  # verifies every part against edgetl.json's sha256
    assert isinstance(runtime.engine, PipelineEngine) and len(runtime.engine.parts) == parts
    np.testing.assert_allclose(runtime.logits(TEXTS), whole, atol=1e-5)
    np.testing.assert_allclose(runtime.logits(TEXTS, batch_size=1), whole, atol=1e-5)  # many inputs in flight
    inline = PipelineEngine(backend, folder, entry["parts"], entry["outputs"], workers=False)
    from edgetl.runtime.text import pad

    feeds = pad(runtime.tokenizer.encode_batch(TEXTS[:4]))
    np.testing.assert_allclose(inline.run(feeds), runtime.engine.run(feeds), atol=1e-6)
    runtime.engine.close()


def test_a_sharded_int8_bundle_answers_as_the_whole_one(tiny_run, tmp_path, dev_texts):
    from edgetl.runtime import load
    from edgetl.sharding import shard_bundle

    shard_bundle(tiny_run / "06-bundle", tmp_path / "sharded", 2, log=lambda _: None)
    for backend in ("onnxruntime", "openvino"):
        whole, parts = load(tiny_run / "06-bundle", backend=backend), load(tmp_path / "sharded", backend=backend)
        assert [p.label for p in parts.predict(dev_texts)] == [p.label for p in whole.predict(dev_texts)]
        # the runtimes fuse INT8 nodes differently at a cut: an activation's rounding may flip, a few 1e-4 in a logit
        np.testing.assert_allclose(parts.logits(dev_texts), whole.logits(dev_texts), atol=1e-3)
        parts.engine.close()


def test_a_shard_stage_after_the_bundle_publishes_a_sharded_bundle_that_answers_as_it(tiny_run, shrink, tmp_path,
                                                                                       dev_texts, quiet_cwd):
    from conftest import copy_run

    from edgetl.pipeline import run_recipe
    from edgetl.recipe import Recipe, load_recipe, resolved_dict
    from edgetl.runtime import load
    from edgetl.runtime.pipeline import PipelineEngine

    run = copy_run(tiny_run, tmp_path / "sst-int8")
    raw = resolved_dict(load_recipe("sst-int8", shrink("sst-int8")))
    raw["stages"].append({"stage": "shard", "parts": 2, "formats": ["onnx"]})
    artifacts = run_recipe(Recipe.model_validate(raw), run)
    assert [a.manifest["stage"] for a in artifacts[-2:]] == ["bundle", "shard"]
    assert artifacts[-2].manifest["timings"] == json.loads((tiny_run / "06-bundle" / "manifest.json").read_text())["timings"]
    sharded = artifacts[-1].path
    models = json.loads((sharded / "edgetl.json").read_text())["models"]
    assert len(models["onnx"]["parts"]) == 2 and "parts" not in models["openvino"]
    whole, parts = load(run / "06-bundle", backend="onnxruntime"), load(sharded, backend="onnxruntime")
    assert isinstance(parts.engine, PipelineEngine)
    assert [p.label for p in parts.predict(dev_texts)] == [p.label for p in whole.predict(dev_texts)]
    parts.engine.close()


def test_the_cli_shards_one_format_and_refuses_what_it_cannot_do(deep_bundle, sharded, tmp_path):
    done = edgetl_cli("shard", str(deep_bundle), str(tmp_path / "onnx-only"), "--parts", "2", "--format", "onnx",
                      cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    models = json.loads((tmp_path / "onnx-only" / "edgetl.json").read_text())["models"]
    assert "parts" in models["onnx"] and "parts" not in models["openvino"]
    predicted = edgetl_cli("predict", str(tmp_path / "onnx-only"), "a gorgeous film", "--backend", "onnxruntime",
                           cwd=tmp_path)
    assert predicted.returncode == 0 and predicted.stdout.split("\t")[0] in {"a", "b", "c"}, predicted.stderr
    for args, message in [(["--parts", "5"], "the model has 4 layers; give 2 to 4 parts"),
                          (["--parts", "2", "--max-part-mb", "0.01"], "no split into 2 parts keeps every part's weights")]:
        done = edgetl_cli("shard", str(deep_bundle), str(tmp_path / "refused"), *args, cwd=tmp_path)
        assert done.returncode != 0 and message in done.stderr, done.stderr
        assert not (tmp_path / "refused").exists() and not list(tmp_path.glob(".refused.*"))  # nothing half-written
    done = edgetl_cli("shard", str(sharded[2][1]), str(tmp_path / "again"), "--parts", "2", cwd=tmp_path)
    assert done.returncode != 0 and "already sharded" in done.stderr
    done = edgetl_cli("shard", str(deep_bundle), str(tmp_path / "onnx-only"), "--parts", "2", cwd=tmp_path)
    assert done.returncode != 0 and "exists" in done.stderr


def test_partition_balances_measured_cost_under_a_memory_cap():
    from edgetl.sharding import partition

    assert partition([1, 1, 1, 3], [1, 1, 1, 1], 2, None) == [3]  # the slow last layer alone
    assert partition([1, 1, 1, 1, 1, 1], [1] * 6, 3, None) == [2, 4]
    assert partition([1, 1, 1, 3], [5, 1, 1, 1], 2, 5) == [1]  # the heavy first layer alone fits the cap
    with pytest.raises(UsageError, match="no split into 2 parts"):
        partition([1, 1, 1], [4, 4, 4], 2, 5)
    with pytest.raises(UsageError, match="give 2 to 3 parts"):
        partition([1, 1, 1], [1, 1, 1], 1, None)


def test_a_dead_worker_fails_the_waiting_call_and_a_broken_part_fails_at_load(sharded, tmp_path):
    from edgetl.runtime import load

    runtime = load(sharded[2][1], backend="onnxruntime")
    os.kill(runtime.engine._processes[1].pid, signal.SIGKILL)
    with pytest.raises(RuntimeError, match="pipeline stopped: part 1's process ended"):
        runtime.logits(TEXTS)
    broken = shutil.copytree(sharded[2][1], tmp_path / "broken")
    part = broken / json.loads((broken / "edgetl.json").read_text())["models"]["onnx"]["parts"][1]["path"]
    part.write_bytes(b"not a model")
    with pytest.raises(ArtifactError, match=r"did not load: part 1 \(part-1.onnx\)"):
        load(broken, backend="onnxruntime", verify=False)
    with pytest.raises(ArtifactError, match="sha256"):
        load(broken, backend="onnxruntime")


def test_a_memory_cap_holds_for_the_process_and_each_part_worker_it_starts(sharded, tmp_path):
    import subprocess
    import sys

    probe = ("import sys; from edgetl.cli import main; from edgetl.runtime import load; "
             "main(['--memory-mb', '3000', 'support']); runtime = load(sys.argv[1], backend='onnxruntime'); "
             "print(runtime.predict(['fine'])[0].label); "
             "[print(next(l for l in open(f'/proc/{p}/limits') if l.startswith('Max data size'))) "
             "for p in ['self', *(w.pid for w in runtime.engine._processes)]]; "
             "import os, signal; os.kill(runtime.engine._processes[1].pid, signal.SIGKILL); "
             "from edgetl.errors import EngineError\n"
             "try: runtime.predict(['fine'])\nexcept EngineError as exc: print('ERROR', exc)")
    done = subprocess.run([sys.executable, "-c", probe, str(sharded[2][1])], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    limits = [line.split()[3] for line in done.stdout.splitlines() if line.startswith("Max data size")]
    assert limits == [str(3000 << 20)] * 3  # this process and both part workers
    assert "ERROR the sharded model's pipeline stopped: part 1's process ended (exit code -9); each process may use " \
           "3000 MB (edgetl --memory-mb)" in done.stdout  # a worker killed under a cap: the cap is named
    for bad in ("0", "-5"):
        refused = edgetl_cli("--memory-mb", bad, "support", cwd=tmp_path)
        assert refused.returncode == 2 and f"--memory-mb {bad}: from 1 to" in refused.stderr


def test_a_model_that_does_not_fit_the_memory_cap_is_named_with_the_cap(monkeypatch, tmp_path):
    import resource

    from edgetl.runtime import engines

    def out_of_memory(*_):
        raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Exception during initialization: std::bad_alloc")

    monkeypatch.setitem(engines.ENGINES, "onnx", out_of_memory)
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    resource.setrlimit(resource.RLIMIT_DATA, (1 << 40, hard))  # a limit far above what this test uses
    try:
        with pytest.raises(OutOfMemoryError, match=r"model.onnx: not enough memory to load the model within this "
                                                r"process's limit of 1048576 MB \(RLIMIT_DATA; edgetl --memory-mb\)"):
            engines.open_engine("onnx", tmp_path / "model.onnx")
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))
    monkeypatch.setitem(engines.ENGINES, "onnx", lambda *_: (_ for _ in ()).throw(RuntimeError("invalid graph")))
    with pytest.raises(RuntimeError, match="invalid graph"):  # other load errors pass through unchanged
        engines.open_engine("onnx", tmp_path / "model.onnx")


@pytest.mark.slow
def test_the_sharding_benchmark_measures_a_run(tiny_run, sst2_slice, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "sharding.py"
    done = subprocess.run([sys.executable, str(script), str(tiny_run), "--texts", str(sst2_slice / "dev.tsv"),
                           "--parts", "2", "--rounds", "1", "--max-texts", "5", "--parity-texts", "20",
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "out" / "sharding.json").read_text())
    parity = {(r["precision"], r["backend"]): r for r in result["parity"]}
    assert set(parity) == {(p, b) for p in ("int8", "fp32") for b in ("onnx", "openvino")}
    assert all(r["texts"] == 20 and r["same_answers"] == 1.0 for r in parity.values())
    assert parity["fp32", "onnx"]["max_abs_diff"] <= 1e-5 and parity["fp32", "openvino"]["max_abs_diff"] <= 1e-5
    sharded = [r for r in result["timing"] if r["parts"] == 2]
    assert len(sharded) == 4 and all(len(r["worker_peak_rss_mb"]) == 2 and r["texts_per_s"] > 0 for r in sharded)
    assert not list(tmp_path.glob("sharding-*"))  # the work folder is removed


@pytest.mark.slow
def test_the_memory_cap_benchmark_runs_a_bundle_whole_and_sharded_under_the_cap(tiny_run, sst2_slice, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "memory_cap.py"
    bundle = next(tiny_run.glob("[0-9][0-9]-bundle"))
    done = subprocess.run([sys.executable, str(script), str(bundle), "--cap", "8000", "--texts", str(sst2_slice / "dev.tsv"),
                           "--max-texts", "8", "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "out" / "memory_cap.json").read_text())
    assert set(result["backends"]) == set(json.loads((bundle / "edgetl.json").read_text())["models"])
    for row in result["backends"].values():  # a cap this model fits: every way runs, and the parts answer alike
        assert [row[k]["returncode"] for k in ("whole", "whole_capped", "sharded_capped")] == [0, 0, 0]
        assert len(row["part_mb"]) == 2 and row["sharded_same_labels"] == 8
    assert "| onnx |" in (tmp_path / "out" / "memory_cap.md").read_text()
