"""``edgetl export-web``: a text-classification, sentence-embedding or token-classification bundle as a static folder
that runs it in a web page (a classifier labels the text typed; an embedding model ranks sentences by their similarity
to it; a token classifier marks the entities among its words).

The folder holds ``index.html`` and ``app.js`` (this package's), the bundle's ``edgetl.json``, tokenizer and ONNX
model, and ``vendor/``: onnxruntime-web (WebAssembly) and tokenizers.js, the versions pinned in this package's
``package-lock.json``, installed once with ``npm ci`` into ``~/.cache/edgetl/web``. The page loads nothing from
anywhere else, so it runs offline from any static server (``edgetl serve --web``).

With ``webgpu=True`` the folder also holds onnxruntime-web's WebGPU build: the page runs the model on the GPU where
the browser offers a WebGPU adapter (operations WebGPU lacks run in WebAssembly) and falls back to the WebAssembly
build elsewhere; a browser downloads only the build it runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from edgetl.artifact import verify_files
from edgetl.errors import ArtifactError, UsageError
from edgetl.runtime.bundle import read_manifest

HERE = Path(__file__).parent
PAGE_FILES = ("index.html", "app.js")
# What the page imports from the npm packages (package -> files of its dist/); vendor/packages.json names their
# versions and licences.
VENDOR = {
    "onnxruntime-web": ("ort.wasm.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm"),
    "@huggingface/tokenizers": ("tokenizers.min.mjs",),
}
WEBGPU = ("ort.webgpu.min.mjs", "ort-wasm-simd-threaded.asyncify.mjs", "ort-wasm-simd-threaded.asyncify.wasm")
WEB_TASKS = ("text-classification", "sentence-embedding", "token-classification")  # app.js's SUPPORTED.tasks
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgetl" / "web"


def web_problem(manifest: dict) -> str | None:
    """Why the page cannot run this bundle, or None. (The format version is read_manifest's to check; in the
    browser, app.js's ``unsupported`` checks the version, task, pairs and the ONNX model again.)"""
    task = manifest.get("task", "text-classification")
    if task not in WEB_TASKS:
        return f"a {task} bundle: the page runs {', '.join(WEB_TASKS)} bundles (so far)"
    if manifest.get("text_pair"):
        return "its model reads pairs of texts; the page runs single texts"
    if task == "token-classification" and manifest.get("truncation") == "head+tail":
        return "truncation head+tail cuts tokens out of a sentence's middle, and with them the words entities are made of"
    if manifest.get("cloze"):
        return "a cloze (prompt) model; the page runs classifier heads only"
    onnx = manifest.get("models", {}).get("onnx")
    if onnx is None:
        return f"no ONNX model (it has: {', '.join(manifest.get('models', {}))}); build the bundle with backends: [onnx]"
    if "parts" in onnx:
        return "a sharded model (edgetl shard): the page runs a whole model file"
    return None


def npm_packages() -> Path:
    """``node_modules`` holding the pinned packages: installed with ``npm ci`` on first use, then reused."""
    lock = (HERE / "package-lock.json").read_bytes()
    target = CACHE / hashlib.sha256(lock).hexdigest()[:16]
    if (target / "node_modules" / ".edgetl-complete").exists():
        return target / "node_modules"
    if shutil.which("npm") is None:
        raise UsageError("export-web fetches onnxruntime-web and tokenizers.js from the npm registry once "
                                     f"(into {CACHE}) and needs npm for it: install Node.js (which brings npm)")
    CACHE.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=CACHE, prefix="install-"))
    try:
        for name in ("package.json", "package-lock.json"):
            shutil.copy2(HERE / name, work / name)
        done = subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=work,
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise ArtifactError(f"npm ci (onnxruntime-web, tokenizers.js) failed in {work}:\n{done.stderr[-2000:]}")
        (work / "node_modules" / ".edgetl-complete").touch()
        shutil.rmtree(target, ignore_errors=True)
        work.rename(target)  # whole or not at all: an interrupted install leaves only an install-* folder
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target / "node_modules"


def export_web(bundle: str | Path, out: str | Path, webgpu: bool = False) -> dict:
    """Write the page folder ``out`` (which must not exist) for ``bundle``; return what it weighs, in bytes.

    ``webgpu`` adds onnxruntime-web's WebGPU build (``WEBGPU``), which the page prefers where a WebGPU adapter exists.
    """
    folder, out = Path(bundle), Path(out)
    manifest = read_manifest(folder)
    problem = web_problem(manifest)
    if problem:
        raise ArtifactError(f"{folder}: export-web cannot run this bundle in a page: {problem}")
    if out.exists():
        raise UsageError(f"{out} exists: export-web writes a new folder")
    verify_files(folder, manifest["files"], "edgetl.json")
    modules = npm_packages()
    model = Path(manifest["models"]["onnx"]["path"])
    files = ["edgetl.json", "tokenizer.json", model.as_posix()]
    if (folder / model.parent / "tokenizer_config.json").is_file():
        files.append((model.parent / "tokenizer_config.json").as_posix())
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        for rel in files:
            (work / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(folder / rel, work / rel)
        for name in PAGE_FILES:
            shutil.copy2(HERE / name, work / name)
        vendor = work / "vendor"
        vendor.mkdir()
        notice = {}
        for package, names in VENDOR.items():
            names = (*names, *WEBGPU) if webgpu and package == "onnxruntime-web" else names
            for name in names:
                shutil.copy2(modules / package / "dist" / name, vendor / name)
            meta = json.loads((modules / package / "package.json").read_text())
            notice[package] = {"version": meta["version"], "license": meta.get("license"), "files": list(names)}
        (vendor / "packages.json").write_text(json.dumps(notice, indent=1) + "\n")
        work.chmod(0o755)  # mkdtemp's folder is private; a page is for serving
        work.rename(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    sizes = {rel: (out / rel).stat().st_size for rel in [*files, *PAGE_FILES]}
    runtime = {p.name: p.stat().st_size for p in sorted((out / "vendor").iterdir())}
    webgpu_bytes = sum(size for name, size in runtime.items() if name in WEBGPU)
    return {"page": sizes, "page_bytes": sum(sizes.values()), "runtime": runtime,
            "runtime_bytes": sum(runtime.values()) - webgpu_bytes, "webgpu_runtime_bytes": webgpu_bytes}


def summary(weights: dict) -> str:
    """What ``edgetl export-web`` prints: the page's download and the runtime's beside it."""
    mb = 1e6
    text = (f"model, tokenizer and page code: {weights['page_bytes'] / mb:.2f} MB; "
            f"runtime (onnxruntime-web WebAssembly, tokenizers.js): {weights['runtime_bytes'] / mb:.2f} MB")
    if weights["webgpu_runtime_bytes"]:
        text += f" (or, where the browser offers WebGPU, its WebGPU build: {weights['webgpu_runtime_bytes'] / mb:.2f} MB)"
    return text


class _PageHandler(SimpleHTTPRequestHandler):
    """Static files, with the headers that make the page cross-origin isolated (WebAssembly threads need it)."""

    extensions_map = {**SimpleHTTPRequestHandler.extensions_map, ".mjs": "text/javascript", ".js": "text/javascript",
                      ".wasm": "application/wasm", ".json": "application/json", ".onnx": "application/octet-stream"}

    def end_headers(self) -> None:
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        self.send_header("Cache-Control", "no-cache")
        super().end_headers()

    def log_message(self, format, *args) -> None:  # noqa: A002 (the base class's name)
        pass


def page_server(folder: str | Path, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """A server of the page folder (not started); port 0 picks a free port."""
    folder = Path(folder)
    if not (folder / "index.html").is_file() or not (folder / "app.js").is_file():
        raise UsageError(f"{folder}: not a folder written by edgetl export-web (no index.html and app.js)")
    return ThreadingHTTPServer((host, port), partial(_PageHandler, directory=str(folder)))


def serve_page(folder: str | Path, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve the page folder until Ctrl-C; the address is printed first."""
    server = page_server(folder, host, port)
    print(f"edgetl serve --web: {folder} on http://{host}:{server.server_address[1]}/", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
