"""Scoring a corpus with a bundle: ``edgetl predict --engine ray`` over JSONL and Parquet shards answers row for row as
the single-process ``edgetl predict`` does, and a job killed halfway finishes on restart without redoing a finished
shard or losing or duplicating a row."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, write_tiny_bundle
from edgetl.errors import UsageError

sys.path.insert(0, str(REPO / "benchmarks"))
from batch_scoring import settled  # noqa: E402

TEXTS = ["a gorgeous , witty film", "dull and lifeless " * 40, "fine", "", "\u00e9l\u00e9gant \U0001f3ac",
         "the battery died after two days", "it works", "not what I hoped for"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_model):
    """An FP32 three-label text-classification bundle of the tiny BERT (random weights, so the labels vary)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig.from_pretrained(str(tiny_model), num_labels=3)
    torch.manual_seed(0)
    model = BertForSequenceClassification(config).eval()
    folder = tmp_path_factory.mktemp("scoring") / "bundle"
    return write_tiny_bundle(folder, model, "text-classification", ["a", "b", "c"], False, tiny_model, 64)


def _corpus(folder, shards: int, rows: int):
    """``shards`` JSONL files of ``rows`` texts each (the last one as Parquet), and every text in order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir()
    texts = []
    for shard in range(shards):
        chunk = [f"{TEXTS[(shard + i) % len(TEXTS)]} {shard}-{i}" for i in range(rows)]
        texts += chunk
        if shard == shards - 1:
            pq.write_table(pa.table({"text": chunk}), folder / f"part-{shard:02d}.parquet")
        else:
            (folder / f"part-{shard:02d}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in chunk))
    return texts


def _scored(out) -> list[dict]:
    import pyarrow.parquet as pq

    return [row for path in sorted(out.glob("*.parquet")) for row in pq.read_table(path).to_pylist()]


def _predict_one_process(bundle, texts, tmp_path) -> list[dict]:
    from edgetl.runtime import load
    from edgetl.scoring import predict_file

    source, target = tmp_path / "all.jsonl", tmp_path / "all-out.jsonl"
    source.write_text("".join(json.dumps(t) + "\n" for t in texts))
    predict_file(load(bundle, backend="onnxruntime"), source, target)
    return [json.loads(line) for line in target.read_text().splitlines()]


def _ray_cli(bundle, source, out, *extra) -> list[str]:
    return [sys.executable, "-m", "edgetl", "predict", str(bundle), "--input", str(source), "--output", str(out),
            "--engine", "ray", "--backend", "onnxruntime", *extra]


def test_a_shard_scores_as_the_single_process_predict_does(bundle, tmp_path):
    from edgetl.runtime import load
    from edgetl.scoring import score_shard

    texts = _corpus(tmp_path / "in", 2, 300)  # longer than one runtime call (256 texts)
    runtime = load(bundle, backend="onnxruntime")
    for path in sorted((tmp_path / "in").iterdir()):
        assert score_shard(runtime, path, tmp_path / f"{path.stem}.parquet") == 300
    assert _scored(tmp_path) == _predict_one_process(bundle, texts, tmp_path)


def test_shards_are_a_folder_or_a_glob_and_two_with_one_name_are_refused(tmp_path):
    from edgetl.scoring import shard_files

    (tmp_path / "in").mkdir()
    for name in ("b.jsonl", "a.parquet", "notes.txt"):
        (tmp_path / "in" / name).write_text("")
    assert [p.name for p in shard_files(str(tmp_path / "in"))] == ["a.parquet", "b.jsonl"]
    assert [p.name for p in shard_files(str(tmp_path / "in" / "*.jsonl"))] == ["b.jsonl"]
    with pytest.raises(UsageError, match=r"--input: no \.jsonl or \.parquet shard in .*empty"):
        shard_files(str(tmp_path / "empty"))
    (tmp_path / "in" / "a.jsonl").write_text("")
    with pytest.raises(UsageError, match=r"a\.jsonl and .*a\.parquet would both be scored into a\.parquet"):
        shard_files(str(tmp_path / "in"))


def test_a_bad_parquet_row_is_named(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from edgetl.scoring import read_shard

    pq.write_table(pa.table({"text": ["fine", None]}), tmp_path / "p.parquet")
    with pytest.raises(UsageError, match=r"p\.parquet: row 1: expected a string or an object with a string 'text'"):
        read_shard(tmp_path / "p.parquet", text_pair=False, takes_words=False)
    (tmp_path / "q.parquet").write_text("not parquet")
    with pytest.raises(UsageError, match=r"q\.parquet: not a readable Parquet file"):
        read_shard(tmp_path / "q.parquet", text_pair=False, takes_words=False)


def test_ray_flags_are_checked_before_anything_runs(bundle, tmp_path):
    from edgetl.cli import main

    with pytest.raises(UsageError, match="--engine ray: --output FOLDER is needed"):
        main(["--debug", "predict", str(bundle), "--input", str(tmp_path), "--engine", "ray"])
    with pytest.raises(UsageError, match="--workers goes with --engine ray"):
        main(["--debug", "predict", str(bundle), "--input", str(tmp_path / "x.jsonl"), "--workers", "2"])


def test_a_finished_shard_from_another_bundle_is_refused(bundle, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from edgetl.scoring import _pending

    _corpus(tmp_path / "in", 2, 4)
    (tmp_path / "out").mkdir()
    pq.write_table(pa.table({"text": ["x"]}).replace_schema_metadata({b"edgetl.bundle": b"other"}),
                   tmp_path / "out" / "part-00.parquet")
    with pytest.raises(UsageError, match=r"part-00\.parquet was scored from another bundle than .*delete it"):
        _pending(bundle, sorted((tmp_path / "in").iterdir()), tmp_path / "out")


@pytest.mark.slow
def test_ray_scores_every_shard_as_one_process_does_and_a_killed_job_resumes(bundle, tmp_path):
    """On a local Ray cluster with 2 workers: kill the job once the first shards are written, restart it; finished
    shards are not redone, and the rows equal the single-process predict's, none lost or repeated."""
    texts = _corpus(tmp_path / "in", 8, 2000)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    job = subprocess.Popen(_ray_cli(bundle, tmp_path / "in", out, "--workers", "2"), env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 240
    while len(list(out.glob("*.parquet"))) < 2 and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    finished = settled(out)  # the killed job's local cluster takes a few seconds to go, and its actors with it
    assert 2 <= len(finished) < 8, "the job should be killed halfway"
    done = subprocess.run(_ray_cli(bundle, tmp_path / "in", out, "--workers", "2"), env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"({len(finished)} shards already done, skipped)" in done.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet") if p.name in finished} == finished
    assert _scored(out) == _predict_one_process(bundle, texts, tmp_path)
    assert not list(out.glob(".*"))  # no temporary file left


@pytest.mark.slow
def test_ray_names_the_bad_line_of_a_shard(bundle, tmp_path):
    _corpus(tmp_path / "in", 2, 3)
    (tmp_path / "in" / "part-00.jsonl").write_text('"fine"\n{"text": 3}\n')
    done = subprocess.run(_ray_cli(bundle, tmp_path / "in", tmp_path / "out", "--workers", "1"), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "part-00.jsonl:2: expected a string or an object with a string 'text'" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out" / "part-00.parquet").exists()
