"""`edgetl serve`: the real uvicorn server in a subprocess, on loopback, with the tiny run's bundle (POST /predict)
and the tiny embedding bundle (POST /embed)."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
from serve_load import request, run_load, start_server, stop_server  # noqa: E402


@pytest.fixture(scope="module")
def bundle(tiny_run):
    return tiny_run / "06-bundle"


@pytest.fixture(scope="module")
def server(bundle):
    process, port = start_server(bundle, "--backend", "onnxruntime")
    yield port
    stop_server(process)


@pytest.fixture(scope="module")
def embedding_server(tiny_embedding_bundle):
    process, port = start_server(tiny_embedding_bundle, "--backend", "onnxruntime")
    yield port
    stop_server(process)


BAD_REQUESTS = [
    ("{not json", 400, "not valid JSON"),
    (b"\xff\xfe{}", 400, "not UTF-8"),
    ("[1, 2]", 422, "either \"text\""),
    ({"texts": ["a"], "text": "b"}, 422, "either \"text\""),
    ({"input": "a"}, 422, "either \"text\""),
    ({"text": 5}, 422, '"text" must be a string, not int'),
    ({"text": None}, 422, '"text" must be a string, not NoneType'),
    ({"texts": "a"}, 422, '"texts" must be a list of strings, not str'),
    ({"texts": ["a", "b", None]}, 422, '"texts"[2] must be a string, not NoneType'),
    ({"texts": ["a"] * 1025}, 413, "over the limit of 1024 per request"),
    ("x" * ((1 << 20) + 1), 413, "over the limit of 1048576 bytes"),
]


# A route -> the fixture of the server that answers it: /predict by a classifier, /embed by an embedder.
SERVED_BY = {"/predict": "server", "/embed": "embedding_server"}


@pytest.fixture(scope="module")
def classifier(bundle):
    from edgetl.runtime import TextClassifier

    return TextClassifier.load(bundle, backend="onnxruntime")


def post(port: int, body: bytes | str | dict, route: str = "/predict", **headers):
    data = json.dumps(body).encode() if isinstance(body, dict) else body.encode() if isinstance(body, str) else body
    return request("127.0.0.1", port, "POST", route, data, headers=headers)


def test_health_and_metadata(server, bundle):
    assert request("127.0.0.1", server, "GET", "/health") == (200, {"status": "ok"})
    status, meta = request("127.0.0.1", server, "GET", "/metadata")
    manifest = json.loads((bundle / "edgetl.json").read_text())
    assert status == 200
    assert meta["labels"] == manifest["labels"] and meta["max_length"] == manifest["max_length"]
    assert meta["backend"] == "onnx" and meta["precision"] == manifest["models"]["onnx"]["precision"]
    assert meta["provenance"] == manifest["provenance"]
    assert meta["task"] == manifest["task"] == "text-classification" and meta["text_pair"] is False


def test_predictions_equal_the_library(server, classifier, dev_texts):
    status, body = post(server, {"texts": dev_texts[:40]})
    assert status == 200
    expected = classifier.predict(dev_texts[:40])
    assert [p["label"] for p in body["predictions"]] == [p.label for p in expected]
    np.testing.assert_allclose([p["score"] for p in body["predictions"]], [p.score for p in expected], atol=1e-4)
    status, body = post(server, {"text": dev_texts[0]})
    assert status == 200 and body["prediction"]["label"] == expected[0].label
    assert set(body["prediction"]["scores"]) == set(classifier.labels)
    assert post(server, {"texts": []}) == (200, {"predictions": []})


def test_concurrent_requests_each_get_their_own_answers(server, classifier, dev_texts):
    """Requests of different sizes from 12 threads are batched together; every answer goes back to its sender."""
    chunks = [dev_texts[i:i + 1 + i % 7] for i in range(0, 96, 4)]

    def ask(texts):
        return post(server, {"texts": texts})

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(ask, chunks))
    for texts, (status, body) in zip(chunks, answers, strict=True):
        assert status == 200
        expected = classifier.predict(texts)
        assert [p["label"] for p in body["predictions"]] == [p.label for p in expected]
        np.testing.assert_allclose([p["score"] for p in body["predictions"]], [p.score for p in expected], atol=1e-4)


@pytest.mark.parametrize("route", SERVED_BY)
@pytest.mark.parametrize("body, status, message", BAD_REQUESTS)
def test_bad_requests_get_4xx_and_the_service_keeps_serving(request, route, body, status, message):
    port = request.getfixturevalue(SERVED_BY[route])
    answer_status, answer = post(port, body, route)
    assert answer_status == status and message in answer["error"]
    assert post(port, {"text": "still here"}, route)[0] == 200


@pytest.mark.parametrize("route", SERVED_BY)
def test_a_chunked_oversize_body_is_cut_off_with_413(request, route):
    """No Content-Length: the limit holds while the body streams in."""
    port = request.getfixturevalue(SERVED_BY[route])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    chunks = (b'{"text": "' + b"y" * 65536 for _ in range(20))
    conn.request("POST", route, body=chunks, encode_chunked=True, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 413 and "over the limit" in json.loads(response.read())["error"]
    conn.close()
    assert post(port, {"text": "still here"}, route)[0] == 200  # (``request`` is pytest's fixture here)


# --- POST /embed ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def embedder(tiny_embedding_bundle):
    from edgetl.runtime import Embedder

    return Embedder.load(tiny_embedding_bundle, backend="onnxruntime")


def test_embed_answers_the_libraries_vectors(embedding_server, embedder, dev_texts):
    texts = [*dev_texts[:30], "", "\ud800 lone surrogate", "a" * 100_000]
    status, body = post(embedding_server, {"texts": texts}, "/embed")
    assert status == 200 and set(body) == {"embeddings"}
    vectors = np.array(body["embeddings"])
    assert vectors.shape == (len(texts), embedder.dimension)
    np.testing.assert_allclose(vectors, embedder.embed(texts), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    status, body = post(embedding_server, {"text": texts[0]}, "/embed")
    assert status == 200 and set(body) == {"embedding"}
    np.testing.assert_allclose(body["embedding"], vectors[0], atol=1e-6)
    assert post(embedding_server, {"texts": []}, "/embed") == (200, {"embeddings": []})


def test_concurrent_embed_and_predict_requests_each_get_their_own_vectors(embedding_server, embedder, dev_texts):
    """/embed and /predict of one embedding bundle share batches; /predict wraps each vector as every task does."""
    chunks = [dev_texts[i:i + 1 + i % 5] for i in range(0, 60, 3)]

    def ask(index_texts):
        index, texts = index_texts
        return post(embedding_server, {"texts": texts}, "/embed" if index % 2 else "/predict")

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, enumerate(chunks)))
    for index, (texts, (status, body)) in enumerate(zip(chunks, answers, strict=True)):
        assert status == 200
        got = body["embeddings"] if index % 2 else [p["embedding"] for p in body["predictions"]]
        np.testing.assert_allclose(got, embedder.embed(texts), atol=1e-6)


def test_generate_on_a_classifier_is_404_naming_predict(server):
    status, body = post(server, {"prompt": "a"}, "/generate")
    assert status == 404 and "POST /predict" in body["error"]


def test_embed_on_a_classifier_is_404_naming_predict(server):
    status, body = post(server, {"text": "a witty film"}, "/embed")
    assert status == 404 and "this service serves a text-classification bundle: POST /predict" in body["error"]
    assert request("127.0.0.1", server, "GET", "/embed") == (405, {"error": "Method Not Allowed"})


def test_embedding_metadata_gives_dimension_and_single_texts(embedding_server, tiny_embedding_bundle, embedder):
    status, meta = request("127.0.0.1", embedding_server, "GET", "/metadata")
    manifest = json.loads((tiny_embedding_bundle / "edgetl.json").read_text())
    assert status == 200 and meta["task"] == "sentence-embedding" and meta["text_pair"] is False
    assert meta["embedding"] == manifest["embedding"] == {"dimension": embedder.dimension, "pooling": "mean",
                                                          "normalize": True}


def test_odd_but_valid_texts_are_classified(server, classifier):
    texts = ["", "   ", "\n\t", "\ud800 lone surrogate", "é" * 10, "a" * 1_000_000]
    status, body = post(server, {"texts": texts})
    assert status == 200 and len(body["predictions"]) == len(texts)
    assert [p["label"] for p in body["predictions"]] == [p.label for p in classifier.predict(texts)]


def test_answers_on_a_keep_alive_connection_do_not_wait_for_delayed_acks(server):
    """Without TCP_NODELAY on accepted sockets every answer took 40 ms (Nagle + delayed ACK); now about 1 ms."""
    conn = http.client.HTTPConnection("127.0.0.1", server, timeout=30)
    times = []
    for _ in range(21):
        start = time.perf_counter()
        request("127.0.0.1", server, "GET", "/health", connection=conn)
        times.append(time.perf_counter() - start)
    conn.close()
    assert sorted(times)[10] < 0.02, f"median {sorted(times)[10] * 1e3:.1f} ms per request"


def test_wrong_method_and_unknown_route(server):
    assert request("127.0.0.1", server, "GET", "/predict") == (405, {"error": "Method Not Allowed"})
    assert request("127.0.0.1", server, "GET", "/nothing") == (404, {"error": "Not Found"})


def test_load_on_loopback_has_no_errors_and_batches_concurrent_requests(bundle, dev_texts):
    process, port = start_server(bundle, "--backend", "onnxruntime")
    try:
        result = run_load(port, dev_texts, requests=600, concurrency=8, time_limit=120)
    finally:
        code, log = stop_server(process)
    print(json.dumps(result))
    assert result["errors"] == 0 and result["unsent"] == 0, result["first_errors"]
    assert result["throughput_per_s"] > 0 and result["p99_ms"] >= result["p50_ms"] > 0
    assert code == 0, log
    batches = int(log.split("served ")[1].split(" batches")[0])
    assert batches < result["completed"], "concurrent requests were never batched together"


def test_sigterm_finishes_the_request_in_flight_then_exits_cleanly(bundle):
    process, port = start_server(bundle, "--backend", "onnxruntime")
    body = json.dumps({"texts": ["a fine film"] * 8}).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:10])
        time.sleep(0.5)  # the request is being read
        process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        sock.sendall(body[10:])
        response = sock.makefile("rb").read()
    assert response.startswith(b"HTTP/1.1 200"), response[:200]
    assert len(json.loads(response.split(b"\r\n\r\n", 1)[1])["predictions"]) == 8
    assert process.wait(timeout=30) == 0
    assert "shut down cleanly" in process.stderr.read()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=5)


def test_serve_refuses_a_bad_bundle_before_listening(tmp_path):
    import subprocess

    result = subprocess.run([sys.executable, "-m", "edgetl", "serve", str(tmp_path), "--port", "0"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "not an edgetl bundle" in result.stderr and "http://" not in result.stdout


@pytest.mark.slow
def test_a_fresh_venv_with_only_the_runtime_and_serve_extras_predicts_and_serves(bundle, tmp_path):
    """`pip install edgetl[serve]` into a new venv: no torch, no transformers, and both interfaces work."""
    import shutil
    import subprocess
    import venv

    source = tmp_path / "src"  # a copy, so pip's in-tree build writes nothing into the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "edgetl"):
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(REPO / name, source / name)
    venv.create(tmp_path / "venv", with_pip=True)
    bin_dir = tmp_path / "venv" / "bin"
    subprocess.run([bin_dir / "python", "-m", "pip", "install", "-q", "--disable-pip-version-check", f"{source}[serve]"],
                   check=True, timeout=600)
    for module in ("torch", "transformers"):
        assert subprocess.run([bin_dir / "python", "-c", f"import {module}"], capture_output=True).returncode != 0
    predicted = subprocess.run([bin_dir / "edgetl", "predict", str(bundle), "a fine film"], capture_output=True,
                               text=True, timeout=120, cwd=tmp_path)
    assert predicted.returncode == 0, predicted.stderr
    assert predicted.stdout.split("\t")[0] in json.loads((bundle / "edgetl.json").read_text())["labels"]
    process = subprocess.Popen([bin_dir / "edgetl", "serve", str(bundle), "--port", "0"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    port = int(process.stdout.readline().rsplit(":", 1)[1])
    try:
        for _ in range(200):
            try:
                assert request("127.0.0.1", port, "GET", "/health")[0] == 200
                break
            except OSError:
                time.sleep(0.05)
        assert post(port, {"text": "a fine film"})[0] == 200
    finally:
        code, log = stop_server(process)
    assert code == 0, log


@pytest.fixture(scope="module")
def ray_server(bundle):
    """`edgetl serve --engine ray --replicas 2`: the same app in two Ray Serve replicas behind Ray's proxy."""
    pytest.importorskip("ray.serve")
    process, port = start_server(bundle, "--backend", "onnxruntime", "--engine", "ray", "--replicas", "2", timeout=300)
    yield port
    code, log = stop_server(process, timeout=120)
    assert code == 0 and "shut down cleanly" in log, log[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("body, status, message", BAD_REQUESTS)
def test_ray_serve_answers_bad_requests_as_edgetl_serve_does(ray_server, server, body, status, message):
    answer = post(ray_server, body)
    assert answer[0] == status and message in answer[1]["error"] and answer == post(server, body)
    assert post(ray_server, {"text": "still here"})[0] == 200


@pytest.mark.slow
def test_ray_serve_routes_predictions_and_a_loopback_load_without_errors(ray_server, server, classifier, dev_texts):
    assert request("127.0.0.1", ray_server, "GET", "/metadata") == request("127.0.0.1", server, "GET", "/metadata")
    for method, route in (("GET", "/predict"), ("GET", "/nothing")):
        assert request("127.0.0.1", ray_server, method, route) == request("127.0.0.1", server, method, route)
    status, body = post(ray_server, {"texts": dev_texts[:40]})
    assert status == 200 and [p["label"] for p in body["predictions"]] == [p.label for p in classifier.predict(dev_texts[:40])]
    result = run_load(ray_server, dev_texts, requests=600, concurrency=8, time_limit=300)
    print(json.dumps(result))
    assert result["errors"] == 0 and result["unsent"] == 0 and result["completed"] == 600, result["first_errors"]


def test_replicas_need_the_ray_engine(bundle):
    import subprocess

    result = subprocess.run([sys.executable, "-m", "edgetl", "serve", str(bundle), "--replicas", "2"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "--replicas needs --engine ray" in result.stderr
