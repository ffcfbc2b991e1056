"""The pipeline: fingerprint skipping, reruns of changed stages and their successors, atomic publish, resume."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import copy_run, manifests
from edgetl.errors import RecipeError

STAGES = ["01-finetune", "02-export", "03-quantize", "04-evaluate", "05-benchmark", "06-bundle"]


def run(recipe_overrides: list[str], run_dir: Path, from_stage: str | None = None):
    from edgetl.pipeline import run_recipe
    from edgetl.recipe import load_recipe

    return run_recipe(load_recipe("sst-int8", recipe_overrides), run_dir, from_stage=from_stage)


# --- skipping and rerunning -------------------------------------------------------------------------------

def test_second_run_skips_every_stage(tiny_run, shrink, tmp_path, caplog, quiet_cwd):
    run_dir = copy_run(tiny_run, tmp_path / "run")
    before = manifests(run_dir)
    assert list(before) == STAGES
    with caplog.at_level(logging.INFO, logger="edgetl"):
        artifacts = run(shrink(), run_dir)
    assert manifests(run_dir) == before  # same started_unix, same fingerprints: nothing was rewritten
    assert [a.name for a in artifacts] == STAGES
    skipped = [r.getMessage() for r in caplog.records if "finished earlier" in r.getMessage()]
    assert [m.split(":")[0] for m in skipped] == STAGES
    assert not [r for r in caplog.records if r.getMessage().endswith(": started")]


@pytest.mark.slow
def test_changing_one_stage_reruns_it_and_the_later_ones_only(dynamic_run):
    before, after = dynamic_run["before"], dynamic_run["after"]
    assert list(after) == STAGES
    kept = [s for s in STAGES if after[s] == before[s]]
    assert kept == ["01-finetune", "02-export"]
    for stage in STAGES[2:]:
        assert after[stage]["fingerprint"] != before[stage]["fingerprint"], stage
        assert after[stage]["timings"]["started_unix"] > before["06-bundle"]["timings"]["started_unix"], stage
    assert after["03-quantize"]["config"]["onnx_method"] == "dynamic"
    # Each rerun stage read the new artifacts, not the old ones.
    evaluate_inputs = {Path(i["path"]).name: i["fingerprint"] for i in after["04-evaluate"]["inputs"]}
    assert evaluate_inputs["03-quantize"] == after["03-quantize"]["fingerprint"]
    assert not list(dynamic_run["run_dir"].glob(".stale-*"))


def test_from_stage_forces_that_stage_and_later_ones(tiny_run, shrink, tmp_path, quiet_cwd):
    run_dir = copy_run(tiny_run, tmp_path / "run")
    before = manifests(run_dir)
    run(shrink(), run_dir, from_stage="bundle")
    after = manifests(run_dir)
    assert [s for s in STAGES if after[s] != before[s]] == ["06-bundle"]
    assert after["06-bundle"]["fingerprint"] == before["06-bundle"]["fingerprint"]
    assert after["06-bundle"]["timings"]["started_unix"] > before["06-bundle"]["timings"]["started_unix"]


def test_from_a_stage_the_recipe_lacks(shrink, tmp_path):
    with pytest.raises(RecipeError, match=r"'prune' is not a stage of sst-int8 \(stages: finetune, export"):
        run(shrink(), tmp_path / "run", from_stage="prune")
    assert not (tmp_path / "run").exists()


def test_fingerprints_follow_what_each_stage_reads():
    from edgetl.pipeline import fingerprint
    from edgetl.recipe import load_recipe

    base = load_recipe("sst-int8")
    variants = {
        "bench": load_recipe("sst-int8", ["bench.rounds=5"]),
        "data": load_recipe("sst-int8", ["data.max_length=64"]),
        "name": load_recipe("sst-int8", ["name=other-name"]),
    }

    def changed(variant) -> list[str]:
        return [s.stage for s, v in zip(base.stages, variant.stages, strict=True)
                if fingerprint(s.model_dump(mode="json"), base, []) != fingerprint(v.model_dump(mode="json"), variant, [])]

    assert changed(variants["bench"]) == ["benchmark"]
    # The bundle writes the data's labels, max length and truncation into edgetl.json, so it reads the data too.
    assert changed(variants["data"]) == ["finetune", "quantize", "evaluate", "benchmark", "bundle"]
    assert changed(variants["name"]) == []  # the recipe's name is no input of any stage
    stage = base.stages[1].model_dump(mode="json")
    assert fingerprint(stage, base, []) != fingerprint({**stage, "opset": 18}, base, [])


# --- atomic publish ---------------------------------------------------------------------------------------

def _fail_after_writing(monkeypatch, module: str):
    import importlib

    stage = importlib.import_module(module)

    def broken(cfg, ctx, out_dir):
        (out_dir / "half-written.txt").write_text("partial output")
        raise RuntimeError("boom: stage crashed halfway")

    monkeypatch.setattr(stage, "run", broken)


def test_failed_stage_publishes_nothing_and_a_rerun_completes(tiny_run, shrink, tmp_path, monkeypatch, quiet_cwd):
    run_dir = copy_run(tiny_run, tmp_path / "run")
    original = json.loads((run_dir / "06-bundle" / "manifest.json").read_text())
    import shutil

    shutil.rmtree(run_dir / "06-bundle")
    with monkeypatch.context() as patch:
        _fail_after_writing(patch, "edgetl.stages.bundle")
        with pytest.raises(RuntimeError, match="boom"):
            run(shrink(), run_dir)
    assert not (run_dir / "06-bundle").exists()
    leftover = run_dir / ".tmp" / "06-bundle"
    assert (leftover / "half-written.txt").is_file()
    # Even a manifest with the right fingerprint in .tmp (a crash just before the rename) is not a finished stage.
    (leftover / "manifest.json").write_text(json.dumps(original))
    failed_at = time.time()
    artifacts = run(shrink(), run_dir)
    bundle = json.loads((run_dir / "06-bundle" / "manifest.json").read_text())
    assert bundle["timings"]["started_unix"] >= round(failed_at, 3) - 0.01
    assert bundle["fingerprint"] == original["fingerprint"]
    assert not (run_dir / "06-bundle" / "half-written.txt").exists()
    assert not leftover.exists()
    artifacts[-1].verify()


def test_failed_rerun_keeps_the_old_artifact_until_the_new_one_is_finished(tiny_run, shrink, tmp_path, monkeypatch,
                                                                          quiet_cwd):
    run_dir = copy_run(tiny_run, tmp_path / "run")
    old = json.loads((run_dir / "06-bundle" / "manifest.json").read_text())
    onnx_only = shrink(stages__bundle__backends="[onnx]")
    with monkeypatch.context() as patch:
        _fail_after_writing(patch, "edgetl.stages.bundle")
        with pytest.raises(RuntimeError, match="boom"):
            run(onnx_only, run_dir)
    assert json.loads((run_dir / "06-bundle" / "manifest.json").read_text()) == old
    run(onnx_only, run_dir)
    new = json.loads((run_dir / "06-bundle" / "manifest.json").read_text())
    assert new["fingerprint"] != old["fingerprint"] and list(new["models"]) == ["onnx"]
    assert not (run_dir / "06-bundle" / "openvino").exists()
    assert not list(run_dir.glob(".stale-*"))


def test_a_failed_stage_exits_1_with_one_clean_line(shrink, tmp_path, capsys, quiet_cwd):
    from edgetl.cli import main

    missing = tmp_path / "no-data"
    code = main(["run", "sst-int8", *shrink(), f"data.path={missing}", "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 1
    assert f"edgetl: error: data.path: file not found: {missing}/train.tsv" in err and "Traceback" not in err
    assert not list((tmp_path / "run").glob("[0-9][0-9]-*"))


def test_a_failed_stage_raises_its_error_in_the_library(shrink, tmp_path, quiet_cwd):
    from edgetl.errors import DataError

    with pytest.raises(DataError, match=r"data\.path: file not found"):
        run([*shrink(), f"data.path={tmp_path / 'no-data'}"], tmp_path / "run")


def test_a_running_stage_shows_a_live_elapsed_line_on_a_terminal(monkeypatch):
    import io

    from edgetl import pipeline

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with pipeline._elapsed_line("01-finetune", time.time()):
        time.sleep(1.3)
    shown = terminal.getvalue()
    assert "01-finetune: running 00:00" in shown and "01-finetune: running 00:01" in shown
    assert shown.endswith("\x1b[2K\r")  # the line is gone once the stage is done


def test_a_running_stage_logs_a_line_a_minute_without_a_terminal(monkeypatch, caplog):
    from edgetl import pipeline

    monkeypatch.setattr(pipeline, "HEARTBEAT_S", 0.1)
    with caplog.at_level(logging.INFO, logger="edgetl"), pipeline._elapsed_line("01-finetune", time.time() - 65):
        time.sleep(0.35)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) >= 2 and all(re.fullmatch(r"01-finetune: still running, 01:0\d elapsed", m) for m in lines)
    assert "\r" not in caplog.text  # no terminal control characters in a CI log


# --- manifests --------------------------------------------------------------------------------------------

EXPECTED_INPUTS = {
    "01-finetune": [],
    "02-export": ["01-finetune"],
    "03-quantize": ["02-export"],
    "04-evaluate": ["01-finetune", "02-export", "03-quantize"],
    "05-benchmark": ["01-finetune", "02-export", "03-quantize", "04-evaluate"],
    "06-bundle": ["03-quantize", "04-evaluate", "05-benchmark"],
}
EXPECTED_KINDS = {"01-finetune": ("pytorch-model", "fp32"), "02-export": ("exported", "fp32"),
                  "03-quantize": ("quantized", "int8"), "04-evaluate": ("evaluation", None),
                  "05-benchmark": ("benchmark", None), "06-bundle": ("bundle", "int8")}


def test_manifests_describe_each_artifact(tiny_run):
    from edgetl.artifact import Artifact

    found = manifests(tiny_run)
    resolved = yaml.safe_load((tiny_run / "recipe.resolved.yaml").read_text())
    assert list(found) == STAGES
    previous_start = 0.0
    for index, (name, manifest) in enumerate(found.items()):
        assert (manifest["kind"], manifest["precision"]) == EXPECTED_KINDS[name]
        assert manifest["stage"] == name.split("-", 1)[1]
        assert manifest["config"] == resolved["stages"][index]
        inputs = {Path(i["path"]).name: i["fingerprint"] for i in manifest["inputs"]}
        assert list(inputs) == EXPECTED_INPUTS[name]
        assert all(inputs[n] == found[n]["fingerprint"] for n in inputs)
        for package in ("python", "edgetl", "torch", "transformers", "onnxruntime", "openvino", "nncf"):
            assert manifest["versions"].get(package), (name, package)
        assert isinstance(manifest["metrics"], dict)
        assert manifest["timings"]["started_unix"] >= previous_start and manifest["timings"]["seconds"] >= 0
        previous_start = manifest["timings"]["started_unix"]
        on_disk = {p.relative_to(tiny_run / name).as_posix() for p in (tiny_run / name).rglob("*") if p.is_file()}
        assert set(manifest["files"]) == on_disk - {"manifest.json"}
        assert all(len(f["sha256"]) == 64 and f["bytes"] > 0 for f in manifest["files"].values())
        Artifact.load(tiny_run / name).verify()


def test_manifests_and_benchmark_results_record_the_commit_of_the_code_that_ran(tiny_run):
    from conftest import REPO

    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    recorded = [m["versions"]["edgetl_commit"] for m in manifests(tiny_run).values()]
    bench = json.loads((tiny_run / "05-benchmark" / "results.json").read_text())
    recorded.append(bench["machine"]["versions"]["edgetl_commit"])
    assert {c.removesuffix("-dirty") for c in recorded} == {head}


def test_resolved_recipe_is_written_with_every_default(tiny_run, shrink):
    from edgetl.recipe import load_recipe, resolved_dict

    resolved = yaml.safe_load((tiny_run / "recipe.resolved.yaml").read_text())
    assert resolved == resolved_dict(load_recipe("sst-int8", shrink()))
    assert resolved["stages"][0]["warmup_ratio"] == 0.06 and resolved["bench"]["throughput_batch_size"] == 32


def test_a_run_writes_nothing_outside_its_folder(tiny_run, quiet_cwd):
    # The tiny run ran with quiet_cwd as its working folder; tools that drop temp files into the cwd show here.
    assert sorted(p.name for p in quiet_cwd.iterdir()) == []


# --- kill -9 and resume -----------------------------------------------------------------------------------

def _wait_for(predicate, timeout: float, proc: subprocess.Popen) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.1)
    return False


@pytest.mark.slow
def test_kill_during_finetune_then_resume(shrink, tmp_path):
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "edgetl", "run", "sst-int8",
               *shrink(stages__finetune__max_steps=60, stages__finetune__eval_steps=5, stages__finetune__ema_decay=0.999),
               "--run-dir", str(run_dir)]
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(command, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            checkpoint = lambda: list(run_dir.glob(".work/01-finetune-*/checkpoint-*/trainer_state.json"))  # noqa: E731
            saw_checkpoint = _wait_for(checkpoint, 300, proc)
            still_running = proc.poll() is None
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
    first_log = (tmp_path / "first.log").read_text()
    assert saw_checkpoint and still_running, first_log[-3000:]
    assert proc.returncode == -signal.SIGKILL
    assert not (run_dir / "01-finetune").exists(), "a killed stage must not look finished"
    assert not list(run_dir.glob("[0-9][0-9]-*"))

    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "finetune: resuming from" in done.stderr and "/checkpoint-" in done.stderr
    assert "weight average of" in done.stderr, "the weight average resumes with the weights"
    found = manifests(run_dir)
    assert list(found) == STAGES
    assert found["01-finetune"]["metrics"]["steps"] == 60
    history = json.loads((run_dir / "01-finetune" / "eval_history.json").read_text())
    assert [h["step"] for h in history] == list(range(5, 65, 5))  # the evaluations before the kill are kept
    assert not list(run_dir.glob(".work/01-finetune-*")), "a finished stage's checkpoints are removed"
    from edgetl.runtime import TextClassifier

    assert TextClassifier.load(run_dir / "06-bundle").predict_one("a fine film").label in ("negative", "positive")


@pytest.mark.slow
def test_kill_during_quantize_then_rerun(tiny_run, shrink, tmp_path):
    run_dir = copy_run(tiny_run, tmp_path / "run")
    for later in STAGES[2:]:
        shutil.rmtree(run_dir / later)
    command = [sys.executable, "-m", "edgetl", "run", "sst-int8", *shrink(), "--run-dir", str(run_dir)]
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(command, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            # The ONNX folder appears just before ONNX Runtime's quantizer starts writing into it.
            deadline = time.monotonic() + 300
            while proc.poll() is None and time.monotonic() < deadline and not (run_dir / ".tmp/03-quantize/onnx").exists():
                time.sleep(0.005)
            caught = proc.poll() is None and (run_dir / ".tmp/03-quantize/onnx").exists()
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
    assert caught, (tmp_path / "first.log").read_text()[-3000:]
    assert not (run_dir / "03-quantize").exists(), "a killed stage must not look finished"

    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "02-export: finished earlier" in done.stderr and "03-quantize: started" in done.stderr
    from edgetl.artifact import Artifact

    for stage in STAGES:
        Artifact.load(run_dir / stage).verify()
