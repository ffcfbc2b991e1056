"""``edgetl serve``: a bundle behind a small HTTP JSON service (Starlette on uvicorn), torch-free.

Routes:
    POST /predict   {"texts": ["...", ...]} -> {"predictions": [{"label", "score", "scores"}, ...]}
                    {"text": "..."}         -> {"prediction": {...}}
    GET  /health    {"status": "ok"}
    GET  /metadata  labels, max length, backend, precision, metrics and provenance of the bundle

Concurrent requests are batched: texts that arrive while a batch runs are classified together in the next
one (up to ``max_batch`` texts). A body over ``max_body_bytes`` is refused with 413 before it is read in
full; malformed JSON is 400; a wrong shape or type is 422 naming the field. SIGINT/SIGTERM stop accepting,
finish requests in flight, then exit.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

from edgetl.errors import MissingDependencyError
from edgetl.runtime.classifier import Prediction, TextClassifier

log = logging.getLogger("edgetl.serve")

MAX_BODY_BYTES = 1 << 20
MAX_TEXTS = 1024


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class MicroBatcher:
    """Classifies the texts of concurrent requests together, one batch at a time, off the event loop."""

    def __init__(self, classifier: TextClassifier, max_batch: int = 64):
        self.classifier = classifier
        self.max_batch = max_batch
        self.queue: asyncio.Queue = asyncio.Queue()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgetl-predict")
        self.task: asyncio.Task | None = None
        self.batches = 0

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Finish what is queued, then stop."""
        await self.queue.put(None)
        if self.task is not None:
            await self.task
        self.executor.shutdown(wait=True)

    async def predict(self, texts: list[str]) -> list[Prediction]:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((texts, future))
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        stopping = False
        while not stopping:
            item = await self.queue.get()
            if item is None:
                break
            batch, size = [item], len(item[0])
            while size < self.max_batch and not self.queue.empty():
                item = self.queue.get_nowait()
                if item is None:
                    stopping = True
                    break
                batch.append(item)
                size += len(item[0])
            texts = [text for request_texts, _ in batch for text in request_texts]
            try:
                predictions = await loop.run_in_executor(self.executor, self.classifier.predict, texts)
            except Exception as exc:  # one bad batch must not stop the service
                log.exception("prediction failed for a batch of %d texts", len(texts))
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            self.batches += 1
            start = 0
            for request_texts, future in batch:
                if not future.done():  # the client may have gone away
                    future.set_result(predictions[start:start + len(request_texts)])
                start += len(request_texts)


async def _read_body(request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise RequestError(400, "invalid Content-Length header")
        if int(declared) > limit:
            raise RequestError(413, f"request body of {int(declared)} bytes is over the limit of {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestError(413, f"request body is over the limit of {limit} bytes")
    return bytes(body)


def parse_predict_request(body: bytes, max_texts: int) -> tuple[list[str], bool]:
    """The texts of a /predict body and whether it asked for one (``text``) or many (``texts``)."""
    try:
        payload = json.loads(body.decode("utf-8"))  # decoded here: json.loads(bytes) would guess UTF-16/32 too
    except UnicodeDecodeError:
        raise RequestError(400, "request body is not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise RequestError(400, f"request body is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    if not isinstance(payload, dict) or ("text" in payload) == ("texts" in payload):
        raise RequestError(422, 'expected a JSON object with either "text": string or "texts": [string, ...]')
    if "text" in payload:
        if not isinstance(payload["text"], str):
            raise RequestError(422, f'"text" must be a string, not {type(payload["text"]).__name__}')
        return [payload["text"]], True
    texts = payload["texts"]
    if not isinstance(texts, list):
        raise RequestError(422, f'"texts" must be a list of strings, not {type(texts).__name__}')
    if len(texts) > max_texts:
        raise RequestError(413, f'"texts" has {len(texts)} items, over the limit of {max_texts} per request')
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise RequestError(422, f'"texts"[{index}] must be a string, not {type(text).__name__}')
    return texts, False


def metadata(classifier: TextClassifier) -> dict:
    manifest = classifier.manifest
    keys = ("format_version", "edgetl_version", "task", "labels", "max_length", "truncation", "input_names",
            "metrics", "provenance")
    return {**{k: manifest.get(k) for k in keys}, "backend": classifier.backend,
            "precision": manifest["models"][classifier.backend].get("precision")}


def create_app(classifier: TextClassifier, max_batch: int = 64, max_body_bytes: int = MAX_BODY_BYTES,
               max_texts: int = MAX_TEXTS):
    """The Starlette app serving ``classifier``."""
    try:
        from starlette.applications import Starlette
        from starlette.exceptions import HTTPException
        from starlette.responses import JSONResponse
        from starlette.routing import Route
    except ImportError:
        raise MissingDependencyError("starlette", "serve", "edgetl serve") from None
    from contextlib import asynccontextmanager

    batcher = MicroBatcher(classifier, max_batch)

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await batcher.stop()
        log.info("served %d batches; stopped", batcher.batches)

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    async def predict(request):
        try:
            texts, single = parse_predict_request(await _read_body(request, max_body_bytes), max_texts)
        except RequestError as exc:
            return error(exc.status, str(exc))
        try:
            predictions = await batcher.predict(texts) if texts else []
        except Exception as exc:
            return error(500, f"prediction failed: {type(exc).__name__}: {exc}")
        rows = [asdict(p) for p in predictions]
        return JSONResponse({"prediction": rows[0]} if single else {"predictions": rows})

    async def health(request):
        return JSONResponse({"status": "ok"})

    async def meta(request):
        return JSONResponse(metadata(classifier))

    async def http_error(request, exc):  # 404, 405 ... as JSON like every other answer
        return error(exc.status_code, exc.detail)

    routes = [Route("/predict", predict, methods=["POST"]), Route("/health", health, methods=["GET"]),
              Route("/metadata", meta, methods=["GET"])]

    return Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error})


def serve(classifier: TextClassifier, host: str = "127.0.0.1", port: int = 8000, **app_options) -> None:
    """Serve until SIGINT/SIGTERM. Port 0 picks a free port; the chosen address is printed first."""
    try:
        import uvicorn
    except ImportError:
        raise MissingDependencyError("uvicorn", "serve", "edgetl serve") from None
    app = create_app(classifier, **app_options)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted connections only then; without it every
    # response waits ~40 ms for the client's delayed ACK (Nagle).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound = sock.getsockname()[1]
    print(f"edgetl serve: {classifier.folder} ({classifier.backend}) on http://{host}:{bound}", flush=True)
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=30, access_log=False)
    # uvicorn handles SIGINT/SIGTERM (stop accepting, finish requests in flight, run the shutdown), then
    # re-raises the signal to the handler that was there before; a no-op one makes that a normal exit (0).
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("edgetl serve: shut down cleanly")
