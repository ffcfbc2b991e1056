"""A recipe under torchrun with two CPU processes, on one node or as two nodes (two launchers on this machine standing
in for two machines): every rank trains, rank 0 alone publishes, once."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import free_port, manifests

TIMEOUT_S = 300


def _launch(nodes: int, node_rank: int, port: int, recipe_args: list[str], cwd, env) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--node_rank", str(node_rank),
               "--nproc_per_node", str(2 // nodes), "--master_addr", "127.0.0.1", "--master_port", str(port),
               "-m", "edgetl", "run", "sst-int8", *recipe_args]
    return subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


@pytest.mark.slow
@pytest.mark.parametrize("nodes", [1, 2])
def test_two_cpu_processes_run_a_recipe_once(shrink, tmp_path, nodes):
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    port = free_port()
    launchers = [_launch(nodes, rank, port, [*shrink(), "--run-dir", str(run_dir)], tmp_path, env)
                 for rank in range(nodes)]
    outputs = [launcher.communicate(timeout=TIMEOUT_S) for launcher in launchers]
    for launcher, (_, stderr) in zip(launchers, outputs, strict=True):
        assert launcher.returncode == 0, stderr[-4000:]
    stderr = "\n".join(err for _, err in outputs)
    found = manifests(run_dir)
    assert list(found) == ["01-finetune", "02-export", "03-quantize", "04-evaluate", "05-benchmark", "06-bundle"]
    leftovers = [p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if "rank" in p.name or ".stale-" in p.name]
    assert leftovers == []
    assert not any((run_dir / ".tmp").glob("*")) and not any((run_dir / ".work").glob("*"))
    finetune = found["01-finetune"]
    assert finetune["metrics"]["steps"] == 6 and finetune["metrics"]["eval_samples"] == 120
    history = json.loads((run_dir / "01-finetune" / "eval_history.json").read_text())
    assert [h["step"] for h in history] == [3, 6]
    # Every stage ran once: one "started" line per stage from rank 0, none from rank 1 outside finetune.
    started = [line for line in stderr.splitlines() if line.endswith(": started")]
    assert sorted(line.split()[-2].rstrip(":") for line in started) == sorted(
        ["01-finetune", "01-finetune", "02-export", "03-quantize", "04-evaluate", "05-benchmark", "06-bundle"])
    from edgetl.runtime import TextClassifier

    assert TextClassifier.load(run_dir / "06-bundle").predict_one("a fine film").label in ("negative", "positive")
