"""``edgetl serve``: a bundle behind a small HTTP JSON service (Starlette on uvicorn), torch-free.

Routes:
    POST /predict   one input under the singular key, or a list under the plural one; what an input is and what
                    the answer holds follow the bundle's task (``task`` and ``text_pair`` in /metadata):
        text-classification   {"text": "..."}           -> {"prediction": {"label", "score", "scores"}}
                              {"texts": ["...", ...]}   -> {"predictions": [{"label", "score", "scores"}, ...]}
        text-regression       the same inputs           -> {"prediction": {"score": x}} / {"predictions": [...]}
        either, for a bundle whose model reads pairs (``text_pair`` true), an input is a pair:
                              {"text": "...", "text_pair": "..."}
                              {"texts": [{"text": "...", "text_pair": "..."} or ["...", "..."], ...]}
        token-classification  {"text": "..."} / {"texts": ["...", ...]}, or pre-split words:
                              {"words": ["...", ...]} / {"sentences": [["...", ...], ...]}
                              -> {"prediction": {"entities": [{"type", "score", "start", "end", "text"}, ...]}}
                                 / {"predictions": [{"entities": [...]}, ...]}; ``start``/``end`` index the text,
                                 or ``" ".join(words)``
        sentence-embedding    {"text": "..."} / {"texts": ["...", ...]} -> {"prediction": {"embedding": [...]}}
                              / {"predictions": [{"embedding": [...]}, ...]} (the envelope every task shares)
    POST /embed     a sentence-embedding bundle's vectors without the envelope: {"text": "..."} -> {"embedding":
                    [x, ...]}, {"texts": ["...", ...]} -> {"embeddings": [[x, ...], ...]}; float32 values, each
                    vector ``dimension`` long (/metadata's ``embedding``), of unit length where ``normalize``. Bodies,
                    limits, batching and errors as /predict's (the two routes' inputs share batches). Another
                    task's bundle answers 404 naming /predict.
    POST /generate  a text-generation bundle's continuation of a prompt: {"prompt": "...", "max_new_tokens": n,
                    "temperature": t, "top_k": k, "top_p": p, "seed": s, "stop": ["..."]} -> {"text", "tokens",
                    "finish_reason"}; with "stream": true, newline-delimited JSON as the tokens come: {"text": piece}
                    per piece, then {"done": true, "tokens", "finish_reason"} (an error after the first piece is a
                    last {"error": ...} line). A prompt over the bundle's max_length tokens, or max_new_tokens over
                    its generation.max_new_tokens, is 422. Generations run one at a time, in arrival order. Another
                    task's bundle answers 404 naming /predict.
    GET  /health    {"status": "ok"}
    GET  /metadata  task, text_pair, labels, max length, backend, precision, metrics and provenance of the bundle
                    (and ``embedding``: dimension, pooling, normalize, for a sentence-embedding bundle)

Concurrent requests are batched: inputs that arrive while a batch runs are predicted together in the next
one (up to ``max_batch`` inputs). A body over ``max_body_bytes`` is refused with 413 before it is read in
full; malformed JSON is 400; a wrong shape or type is 422 naming the field (and the index in a list). SIGINT/SIGTERM
stop accepting, finish requests in flight, then exit.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
from concurrent.futures import ThreadPoolExecutor

from edgetl.errors import MissingDependencyError, UsageError
from edgetl.runtime.bundle import BundleRuntime
from edgetl.runtime.embedder import Embedder
from edgetl.runtime.generator import Generator
from edgetl.runtime.payloads import RequestError, parse_generate_request, parse_predict_request

log = logging.getLogger("edgetl.serve")

MAX_BODY_BYTES = 1 << 20
MAX_TEXTS = 1024


class MicroBatcher:
    """Predicts the inputs of concurrent requests together, one batch at a time, off the event loop.

    A request names the runtime method for its inputs (``predict``, or ``predict_words`` for word lists); the
    inputs of one batch go to each method they name in one call.
    """

    def __init__(self, runtime: BundleRuntime, max_batch: int = 64):
        self.runtime = runtime
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

    async def predict(self, items: list, method: str = "predict") -> list:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((method, items, future))
        return await future

    async def _run(self) -> None:
        stopping = False
        while not stopping:
            entry = await self.queue.get()
            if entry is None:
                break
            batch, size = [entry], len(entry[1])
            while size < self.max_batch and not self.queue.empty():
                entry = self.queue.get_nowait()
                if entry is None:
                    stopping = True
                    break
                batch.append(entry)
                size += len(entry[1])
            for method in dict.fromkeys(method for method, _, _ in batch):
                await self._predict_batch(method, [entry for entry in batch if entry[0] == method])

    async def _predict_batch(self, method: str, batch: list) -> None:
        items = [item for _, request_items, _ in batch for item in request_items]
        try:
            results = await asyncio.get_running_loop().run_in_executor(self.executor, getattr(self.runtime, method), items)
        except Exception as exc:  # one bad batch must not stop the service
            log.exception("prediction failed for a batch of %d inputs", len(items))
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        self.batches += 1
        start = 0
        for _, request_items, future in batch:
            if not future.done():  # the client may have gone away
                future.set_result(results[start:start + len(request_items)])
            start += len(request_items)


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


def metadata(runtime: BundleRuntime) -> dict:
    manifest = runtime.manifest
    keys = ("format_version", "edgetl_version", "labels", "max_length", "truncation", "input_names", "metrics",
            "provenance")
    extra = {k: manifest[k] for k in ("embedding", "generation") if k in manifest}
    return {**{k: manifest.get(k) for k in keys}, **extra, "task": runtime.task, "text_pair": runtime.text_pair,
            "backend": runtime.backend, "precision": manifest["models"][runtime.backend].get("precision")}


def create_app(runtime: BundleRuntime, max_batch: int = 64, max_body_bytes: int = MAX_BODY_BYTES,
               max_texts: int = MAX_TEXTS):
    """The Starlette app serving ``runtime`` (``edgetl.runtime.load``'s answer for the bundle)."""
    try:
        from starlette.applications import Starlette
        from starlette.exceptions import HTTPException
        from starlette.responses import JSONResponse, StreamingResponse
        from starlette.routing import Route
    except ImportError:
        raise MissingDependencyError("starlette", "serve", "edgetl serve") from None
    from contextlib import asynccontextmanager

    batcher = MicroBatcher(runtime, max_batch)

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await batcher.stop()
        log.info("served %d batches; stopped", batcher.batches)

    class JSON(JSONResponse):
        def render(self, content) -> bytes:
            try:
                return super().render(content)
            except UnicodeEncodeError:  # a lone surrogate of the caller's text, echoed in an entity: escape it
                return json.dumps(content, allow_nan=False, separators=(",", ":")).encode("ascii")

    def error(status: int, message: str) -> JSONResponse:
        return JSON({"error": message}, status_code=status)

    async def answer(request) -> tuple[list, bool] | JSONResponse:
        """The results of a request's inputs and whether it asked for one, or the error response to send."""
        try:
            body = await _read_body(request, max_body_bytes)
            method, items, single = parse_predict_request(body, max_texts, runtime.text_pair, runtime.takes_words)
        except RequestError as exc:
            return error(exc.status, str(exc))
        try:
            return (await batcher.predict(items, method) if items else []), single
        except Exception as exc:
            return error(500, f"prediction failed: {type(exc).__name__}: {exc}")

    async def predict(request):
        answered = await answer(request)
        if isinstance(answered, JSONResponse):
            return answered
        rows = [runtime.to_json(result) for result in answered[0]]
        return JSON({"prediction": rows[0]} if answered[1] else {"predictions": rows})

    async def embed(request):
        if not isinstance(runtime, Embedder):
            return error(404, f"/embed serves sentence-embedding bundles; this service serves a {runtime.task} "
                              f"bundle: POST /predict")
        answered = await answer(request)
        if isinstance(answered, JSONResponse):
            return answered
        rows = [vector.tolist() for vector in answered[0]]
        return JSON({"embedding": rows[0]} if answered[1] else {"embeddings": rows})

    generating = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgetl-generate")

    async def generate(request):
        if not isinstance(runtime, Generator):
            return error(404, f"/generate serves text-generation bundles; this service serves a {runtime.task} "
                              f"bundle: POST /predict")
        try:
            prompt, options, stream = parse_generate_request(await _read_body(request, max_body_bytes))
            settings = runtime.settings_for(None, **options)
            runtime.prompt_ids(prompt)  # refused here, before a 200 starts a stream
        except RequestError as exc:
            return error(exc.status, str(exc))
        except UsageError as exc:
            return error(422, str(exc))
        loop = asyncio.get_running_loop()
        if not stream:
            result = await loop.run_in_executor(generating, runtime.generate, prompt, settings)
            return JSON(runtime.to_json(result))
        pieces = runtime.pieces(prompt, settings)

        async def lines():
            text, state = "", ([], "length")
            try:
                while (step := await loop.run_in_executor(generating, next, pieces, None)) is not None:
                    piece, state = step
                    if piece:
                        text += piece
                        yield json.dumps({"text": piece}) + "\n"
            except Exception as exc:  # the status line is sent: the error goes in the stream
                log.exception("generation failed")
                yield json.dumps({"error": f"generation failed: {type(exc).__name__}: {exc}"}) + "\n"
                return
            yield json.dumps({"done": True, "tokens": len(state[0]), "finish_reason": state[1]}) + "\n"

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    async def health(request):
        return JSON({"status": "ok"})

    async def meta(request):
        return JSON(metadata(runtime))

    async def http_error(request, exc):  # 404, 405 ... as JSON like every other answer
        return error(exc.status_code, exc.detail)

    routes = [Route("/predict", predict, methods=["POST"]), Route("/embed", embed, methods=["POST"]),
              Route("/generate", generate, methods=["POST"]),
              Route("/health", health, methods=["GET"]), Route("/metadata", meta, methods=["GET"])]

    return Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error})


def serve(runtime: BundleRuntime, host: str = "127.0.0.1", port: int = 8000, **app_options) -> None:
    """Serve until SIGINT/SIGTERM. Port 0 picks a free port; the chosen address is printed first."""
    try:
        import uvicorn
    except ImportError:
        raise MissingDependencyError("uvicorn", "serve", "edgetl serve") from None
    app = create_app(runtime, **app_options)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted connections only then; without it every
    # response waits ~40 ms for the client's delayed ACK (Nagle).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound = sock.getsockname()[1]
    print(f"edgetl serve: {runtime.folder} ({runtime.backend}) on http://{host}:{bound}", flush=True)
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
