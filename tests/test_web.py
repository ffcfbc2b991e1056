"""`edgetl export-web`: the page folder, its refusals, and the page itself in headless Chromium."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, SHARED_CONLL, SHARED_ELECTRONICS, SHARED_SST2

from edgetl.errors import ArtifactError, UsageError


def _bundle_copy(bundle: Path, target: Path, **changes) -> Path:
    """A copy of ``bundle`` whose edgetl.json has ``changes`` (edgetl.json is not in its own file table)."""
    shutil.copytree(bundle, target)
    manifest = json.loads((target / "edgetl.json").read_text())
    (target / "edgetl.json").write_text(json.dumps({**manifest, **changes}))
    return target


@pytest.mark.parametrize(("changes", "reason"), [
    ({"task": "text-generation"}, "a text-generation bundle"),
    ({"task": "token-classification", "truncation": "head+tail"}, "truncation head\\+tail"),
    ({"text_pair": True}, "pairs of texts"),
    ({"models": {}}, "no ONNX model"),
])
def test_export_web_refuses_a_bundle_the_page_cannot_run_before_writing_anything(tiny_run, tmp_path, changes, reason):
    from edgetl.web import export_web

    bundle = _bundle_copy(tiny_run / "06-bundle", tmp_path / "bundle", **changes)
    with pytest.raises(ArtifactError, match=reason):
        export_web(bundle, tmp_path / "page")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_export_web_refuses_an_existing_folder(tiny_run, tmp_path):
    from edgetl.web import export_web

    (tmp_path / "page").mkdir()
    with pytest.raises(UsageError, match="exists"):
        export_web(tiny_run / "06-bundle", tmp_path / "page")


def _page_check(bundle: Path, page: Path, texts: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / "web_page.py"), str(bundle), str(page),
                           "--texts", str(texts), *args], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def long_texts(tmp_path_factory) -> Path:
    """SST-2 dev (872 sentences) and 40 Amazon reviews, longer than the tiny runs' max_length: truncation at work."""
    reviews = [json.loads(line)["text"].replace("\n", " ").replace("\t", " ")
               for line in (SHARED_ELECTRONICS / "dev.jsonl").read_text().splitlines()[:40]]
    path = tmp_path_factory.mktemp("texts") / "texts.txt"
    sentences = [line.split("\t")[0] for line in (SHARED_SST2 / "dev.tsv").read_text().splitlines()[1:] if line]
    path.write_text("\n".join(sentences + reviews) + "\n")
    return path


@pytest.mark.slow
@pytest.mark.parametrize("truncation", ["right", "left", "head+tail"])
def test_the_page_answers_as_the_python_runtime_offline(tiny_runs, tmp_path, long_texts, truncation):
    """Chromium (benchmarks/render_html.py finds or fetches it) opens the exported page with every host but the
    page's unresolvable; on 912 texts its token ids and labels equal the Python runtime's and its probabilities are
    within 1e-3 (the tiny sst-tiny bundle: pruned vocabulary, static INT8)."""
    from edgetl.web import export_web

    if not shutil.which("npm"):
        pytest.skip("export-web fetches onnxruntime-web with npm, which is not here")
    bundle = _bundle_copy(tiny_runs("sst-tiny") / "08-bundle", tmp_path / "bundle", truncation=truncation, head_tokens=16)
    export_web(bundle, tmp_path / "page")
    done = _page_check(bundle, tmp_path / "page", long_texts, "--png", str(tmp_path / "page.png"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["texts"] == 912 and report["token_ids_differ"] == report["labels_differ"] == 0
    assert report["largest_probability_difference"] <= 1e-3 and report["requests_outside_the_page"] == []
    assert report["cross_origin_isolated"] and (tmp_path / "page.png").stat().st_size > 5_000


@pytest.mark.slow
def test_the_page_says_why_it_cannot_run_a_newer_bundle(tiny_run, tmp_path, long_texts):
    from edgetl.web import export_web

    if not shutil.which("npm"):
        pytest.skip("export-web fetches onnxruntime-web with npm, which is not here")
    export_web(tiny_run / "06-bundle", tmp_path / "page")
    manifest = json.loads((tmp_path / "page" / "edgetl.json").read_text())
    (tmp_path / "page" / "edgetl.json").write_text(json.dumps({**manifest, "format_version": 2}))
    done = _page_check(tiny_run / "06-bundle", tmp_path / "page", long_texts)
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
    assert "format version 2 is newer than this page reads" in json.loads(done.stdout)["error"]


@pytest.mark.slow
def test_a_webgpu_page_runs_on_webgpu_where_offered_and_says_why_not_elsewhere(tiny_runs, tmp_path):
    """Chromium's WebGPU adapter here is SwiftShader's (no GPU): the WebGPU provider runs, on the CPU."""
    from edgetl.web import WEBGPU, export_web

    if not shutil.which("npm"):
        pytest.skip("export-web fetches onnxruntime-web with npm, which is not here")
    bundle = tiny_runs("sst-tiny") / "08-bundle"
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(line.split("\t")[0] for line in (SHARED_SST2 / "dev.tsv").read_text().splitlines()[1:101]))
    weights = export_web(bundle, tmp_path / "webgpu", webgpu=True)
    assert set(WEBGPU) <= set(weights["runtime"]) and weights["webgpu_runtime_bytes"] > 0

    done = _page_check(bundle, tmp_path / "webgpu", texts, "--backend", "webgpu")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["backend"] == "webgpu" and report["token_ids_differ"] == report["labels_differ"] == 0
    assert report["runtime_bytes"] >= weights["webgpu_runtime_bytes"]  # the page downloaded the WebGPU build

    export_web(bundle, tmp_path / "wasm")
    done = _page_check(bundle, tmp_path / "wasm", texts, "--backend", "auto")  # WebGPU offered, build not shipped
    assert done.returncode == 0 and json.loads(done.stdout)["backend"] == "wasm", done.stdout[-3000:] + done.stderr[-3000:]
    done = _page_check(bundle, tmp_path / "wasm", texts, "--backend", "webgpu")
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
    assert "WebGPU was asked for, but this page was exported without --webgpu" in json.loads(done.stdout)["error"]


@pytest.mark.slow
def test_an_embedding_page_gives_the_python_runtimes_vectors_offline(tiny_embedding_bundle, tmp_path, long_texts):
    """The tiny FP32 sentence-embedding bundle (mean-pooled, L2-normalised in the graph) on the same 912 texts."""
    from edgetl.web import export_web

    if not shutil.which("npm"):
        pytest.skip("export-web fetches onnxruntime-web with npm, which is not here")
    export_web(tiny_embedding_bundle, tmp_path / "page")
    done = _page_check(tiny_embedding_bundle, tmp_path / "page", long_texts, "--png", str(tmp_path / "page.png"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["task"] == "sentence-embedding" and report["texts"] == 912 and report["token_ids_differ"] == 0
    assert report["largest_vector_value_difference"] <= 1e-4 and report["lowest_cosine"] > 0.9999
    assert report["requests_outside_the_page"] == [] and (tmp_path / "page.png").stat().st_size > 5_000


@pytest.mark.slow
def test_a_token_classification_page_marks_the_python_runtimes_entities_offline(tiny_runs, tmp_path):
    """The tiny NER bundle on 600 CoNLL-2003 dev sentences and 40 texts of ten sentences each, past max_length: the
    page's token ids, entities (type and span) and entity scores against the runtime's predict_words."""
    from edgetl.web import export_web

    if not shutil.which("npm"):
        pytest.skip("export-web fetches onnxruntime-web with npm, which is not here")
    sentences = [" ".join(json.loads(line)["tokens"]) for line in (SHARED_CONLL / "dev.jsonl").read_text().splitlines()
                 if line.strip()][:1000]
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(sentences[:600] + [" ".join(sentences[i:i + 10]) for i in range(600, 1000, 10)]) + "\n")
    bundle = tiny_runs("conll-ner-int8") / "06-bundle"
    export_web(bundle, tmp_path / "page")
    done = _page_check(bundle, tmp_path / "page", texts, "--png", str(tmp_path / "page.png"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["task"] == "token-classification" and report["texts"] == 640
    assert report["token_ids_differ"] == report["labels_differ"] == 0 and report["entities"]["page"] > 100
    assert report["largest_probability_difference"] <= 1e-3 and report["requests_outside_the_page"] == []
    assert (tmp_path / "page.png").stat().st_size > 5_000


def test_serve_web_sends_the_headers_that_give_webassembly_threads(tmp_path):
    import threading
    import urllib.request

    from edgetl.web import page_server

    with pytest.raises(UsageError, match="not a folder written by edgetl export-web"):
        page_server(tmp_path)
    for name in ("index.html", "app.js", "vendor.wasm"):
        (tmp_path / name).write_text("x")
    server = page_server(tmp_path)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.server_address[1]}/vendor.wasm") as response:
            headers = response.headers
    finally:
        server.shutdown()
        server.server_close()
    assert headers["Cross-Origin-Opener-Policy"] == "same-origin"
    assert headers["Cross-Origin-Embedder-Policy"] == "require-corp"
    assert headers["Content-Type"] == "application/wasm"
