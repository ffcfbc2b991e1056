"""The bundle stage and artifact integrity: edgetl.json, checksums, and what a damaged folder gets."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from edgetl.errors import ArtifactError

TEXTS = ["a gorgeous , witty , seductive movie that is also one of the best films of the year", "dull"]


# --- bundle -----------------------------------------------------------------------------------------------

def test_bundle_manifest(tiny_run, tiny_artifacts):
    from edgetl.artifact import sha256_file

    bundle = tiny_run / "06-bundle"
    info = json.loads((bundle / "edgetl.json").read_text())
    assert (info["format"], info["format_version"]) == ("edgetl-bundle", 1)
    assert info["labels"] == ["negative", "positive"] and info["max_length"] == 64
    # Static INT8 with dynamic FFN down-projections (the stage default) is batch-dependent in ONNX Runtime.
    assert info["models"] == {"onnx": {"path": "onnx/model.onnx", "precision": "int8", "batch_invariant": False},
                              "openvino": {"path": "openvino/model.xml", "precision": "int8", "batch_invariant": True}}
    on_disk = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()}
    assert set(info["files"]) == on_disk - {"edgetl.json", "manifest.json"}
    for rel, entry in info["files"].items():
        assert sha256_file(bundle / rel) == entry["sha256"], rel
    accuracy = tiny_artifacts["evaluate"].metrics
    assert info["metrics"]["per_backend"]["onnx"]["accuracy"] == accuracy["onnx-int8 (03-quantize)"]
    assert info["provenance"]["source_artifact"] == "03-quantize"


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_bundle_loads_and_predicts(tiny_run, backend):
    from edgetl.runtime import TextClassifier

    classifier = TextClassifier.load(tiny_run / "06-bundle", backend=backend)
    predictions = classifier.predict(TEXTS)
    assert [p.label in ("negative", "positive") for p in predictions] == [True, True]
    for p in predictions:
        assert sum(p.scores.values()) == pytest.approx(1.0, abs=1e-5) and p.score == max(p.scores.values())


@pytest.fixture
def bundle_copy(tiny_run, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_run / "06-bundle", tmp_path / "bundle"))


@pytest.mark.parametrize("rel", ["onnx/model.onnx", "openvino/model.bin", "tokenizer.json"])
def test_corrupted_bundle_file_is_refused(bundle_copy, rel):
    from edgetl.runtime import TextClassifier

    data = bytearray((bundle_copy / rel).read_bytes())
    middle = len(data) // 2
    data[middle : middle + 8] = bytes(b ^ 0xFF for b in data[middle : middle + 8])
    (bundle_copy / rel).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=rf"{re.escape(rel)} does not match its sha256"):
        TextClassifier.load(bundle_copy)


def test_bundle_with_a_missing_file_is_refused(bundle_copy):
    from edgetl.runtime import TextClassifier

    (bundle_copy / "openvino" / "model.bin").unlink()
    with pytest.raises(ArtifactError, match=r"missing file openvino/model\.bin"):
        TextClassifier.load(bundle_copy, backend="onnxruntime")


@pytest.mark.parametrize("field, value", [("format_version", 99), ("format", "something-else")])
def test_bundle_of_another_format_is_refused(bundle_copy, field, value):
    from edgetl.runtime import TextClassifier

    path = bundle_copy / "edgetl.json"
    info = json.loads(path.read_text())
    info[field] = value
    path.write_text(json.dumps(info))
    with pytest.raises(ArtifactError, match=r"is not supported \(this edgetl reads versions \(1,\)\)"):
        TextClassifier.load(bundle_copy)


def test_unreadable_bundle_manifest_is_refused(bundle_copy):
    from edgetl.runtime import TextClassifier

    (bundle_copy / "edgetl.json").write_text("{half a manifest")
    with pytest.raises(ArtifactError, match=r"edgetl\.json"):
        TextClassifier.load(bundle_copy)


def test_folder_that_is_not_a_bundle_is_refused(tiny_run):
    from edgetl.runtime import TextClassifier

    with pytest.raises(ArtifactError, match=r"not an edgetl bundle \(no edgetl\.json\)"):
        TextClassifier.load(tiny_run / "03-quantize")


def test_bundle_without_the_requested_backend_is_refused(bundle_copy):
    from edgetl.runtime import TextClassifier

    path = bundle_copy / "edgetl.json"
    info = json.loads(path.read_text())
    del info["models"]["openvino"]
    path.write_text(json.dumps(info))
    with pytest.raises(ArtifactError, match=r"backend 'openvino' is not in this bundle \(it has: \['onnx'\]\)"):
        TextClassifier.load(bundle_copy, backend="openvino")
    assert TextClassifier.load(bundle_copy).backend == "onnx"


@pytest.fixture
def quantize_copy(tiny_run, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_run / "03-quantize", tmp_path / "03-quantize"))


def test_artifact_verify_catches_an_edited_file(quantize_copy):
    from edgetl.artifact import Artifact

    Artifact.load(quantize_copy).verify()
    with open(quantize_copy / "onnx" / "model.onnx", "r+b") as handle:
        handle.seek(100)
        byte = handle.read(1)
        handle.seek(100)
        handle.write(bytes([byte[0] ^ 0x01]))
    with pytest.raises(ArtifactError, match=r"onnx/model\.onnx does not match its sha256 in manifest\.json"):
        Artifact.load(quantize_copy).verify()


def test_artifact_verify_catches_a_missing_file(quantize_copy):
    from edgetl.artifact import Artifact

    (quantize_copy / "openvino" / "model.bin").unlink()
    with pytest.raises(ArtifactError, match=r"missing file openvino/model\.bin"):
        Artifact.load(quantize_copy).verify()


def test_folder_without_manifest_is_not_an_artifact(tmp_path):
    from edgetl.artifact import Artifact

    with pytest.raises(ArtifactError, match=r"not a finished artifact \(no manifest\.json\)"):
        Artifact.load(tmp_path)
    (tmp_path / "manifest.json").write_text("{half a")
    with pytest.raises(ArtifactError, match="unreadable manifest"):
        Artifact.load(tmp_path)


@pytest.mark.parametrize("field, value, message", [
    ("vocab_size", 10, r"tokenizer.json gives token ids up to \d+, but the model has 10 embedding rows"),
    ("id2label", {"0": "a", "1": "b", "2": "c"}, r"edgetl.json lists 2 labels, the model has 3"),
])
def test_tokenizer_or_labels_that_do_not_fit_the_model_are_refused(bundle_copy, field, value, message):
    import json

    from edgetl.errors import ArtifactError
    from edgetl.runtime import TextClassifier

    config_file = bundle_copy / "onnx" / "config.json"
    config = json.loads(config_file.read_text())
    config[field] = value
    config_file.write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match=message):
        TextClassifier.load(bundle_copy, backend="onnxruntime", verify=False)  # checksums would stop it earlier


def test_the_onnx_folder_loads_unchanged_in_optimum(tiny_run):
    from optimum.onnxruntime import ORTModelForSequenceClassification
    from transformers import AutoTokenizer

    from edgetl.runtime import TextClassifier

    folder = tiny_run / "06-bundle" / "onnx"
    model = ORTModelForSequenceClassification.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    theirs = model(**tokenizer(TEXTS, return_tensors="pt", padding=True)).logits.numpy()
    # One batch on both sides: this model's dynamic-INT8 layers make logits depend on batch-mates.
    ours = TextClassifier.load(tiny_run / "06-bundle", backend="onnxruntime").logits(TEXTS, batch_size=len(TEXTS))
    assert abs(theirs - ours).max() < 1e-5


def test_the_openvino_ir_runs_in_benchmark_app(tiny_run, tmp_path):
    import subprocess
    import sys

    tool = Path(sys.executable).with_name("benchmark_app")
    shape = ",".join(f"{name}[1,16]" for name in ("input_ids", "attention_mask", "token_type_ids"))
    done = subprocess.run([str(tool), "-m", str(tiny_run / "06-bundle" / "openvino" / "model.xml"), "-d", "CPU",
                           "-niter", "10", "-api", "sync", "-data_shape", shape],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "Throughput" in done.stdout
