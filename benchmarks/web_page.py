"""An `edgetl export-web` page in headless Chromium against the Python runtime on the same texts and model file.

    .venv/bin/python benchmarks/web_page.py BUNDLE PAGE_DIR [--texts FILE [--field NAME]] [--out OUT.json] [--png OUT.png]
        [--rounds 2] [--backend auto|wasm|webgpu] [--chromium PATH]

Serves PAGE_DIR as `edgetl serve --web` does (cross-origin isolated, so WebAssembly gets threads) and opens it in
Chromium (found as benchmarks/render_html.py finds it) with every host but 127.0.0.1 unresolvable, recording each
request the page makes. Then, for every text of --texts (default: SST-2 dev, 872 sentences; a .tsv's `sentence`
column, with `label` the page's and the runtime's accuracy; a .jsonl's --field, a list of words joined by spaces, as
CoNLL-2003's `tokens`; or a .txt's lines): the page's token ids and the Python runtime's (`edgetl.runtime.load(BUNDLE)`), the
labels and the largest probability difference (a sentence-embedding bundle: the largest difference of a vector's
values, and the lowest cosine between the page's vector and the runtime's; a token-classification bundle: texts whose
entities differ in type or span, and the largest difference of an entity's score, against the runtime's
`predict_words(text.split())`, the words the page tags); and, for scale, how far the Python runtime's own answers move when
ONNX Runtime runs the model without its graph optimizations (no fused x86 kernels). With --rounds N it times batch-1 predictions (tokenize, run, softmax;
one text per call) in the page and in the Python runtime (ONNX Runtime, the same model file), each in its own
block, the order alternating by round, and reports each block's p50. A screenshot of the page showing a
prediction (or a ranking) goes to --png. --backend opens the page with ?backend= (webgpu: Chromium gets a WebGPU adapter, which
on a machine without a GPU is SwiftShader's, on the CPU: its timings say nothing of a GPU). Prints JSON (also written to --out); exits 1 if a token id or a label differs, a
probability (or a vector's value) differs by more than 1e-3, or the page requested anything outside its own folder; 2 (printing the
message the page shows) if the page cannot load its bundle.
"""

from __future__ import annotations

import argparse
import base64
import json
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

from render_html import DevTools, find_chromium

PROBABILITY_TOLERANCE = 1e-3
DEV = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "sst2" / "dev.tsv"


def read_texts(path: Path, field: str = "text") -> tuple[list[str], list[int] | None]:
    """The texts, and their gold labels where the file has them (a .tsv's `label` column)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix == ".jsonl":
        values = [json.loads(line)[field] for line in lines if line.strip()]
        return [" ".join(v) if isinstance(v, list) else v for v in values], None
    if path.suffix == ".tsv":
        header = lines[0].split("\t")
        rows = [line.split("\t") for line in lines[1:] if line]
        gold = [int(row[header.index("label")]) for row in rows] if "label" in header else None
        return [row[header.index("sentence")] for row in rows], gold
    return [line for line in lines if line], None


class Page:
    """The page open in a Chromium tab; ``run(js)`` awaits an async expression and returns its JSON value."""

    def __init__(self, binary: Path, url: str, timeout: float, webgpu: bool = False):
        # Every host name but the page's own resolves to nothing: the page must not need the network.
        self.browser = DevTools(binary, ("--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",), timeout, webgpu)
        self.version = self.browser.call("Browser.getVersion")["product"]
        target = self.browser.call("Target.createTarget", url="about:blank")["targetId"]
        self.tab = self.browser.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.browser.call("Emulation.setDeviceMetricsOverride", self.tab, width=900, height=700, deviceScaleFactor=1,
                          mobile=False)
        self.browser.call("Network.enable", self.tab)
        self.browser.call("Page.enable", self.tab)
        navigation = self.browser.call("Page.navigate", self.tab, url=url)
        if navigation.get("errorText"):
            sys.exit(f"web_page: Chromium could not open {url}: {navigation['errorText']}")
        self.browser.wait_event("Page.loadEventFired")

    def run(self, expression: str):
        reply = self.browser.call("Runtime.evaluate", self.tab, expression=expression, awaitPromise=True,
                                  returnByValue=True)
        if "exceptionDetails" in reply:
            details = reply["exceptionDetails"]
            raise RuntimeError(details.get("exception", {}).get("description") or details.get("text"))
        return reply["result"].get("value")

    def requests(self) -> list[str]:
        return [m["params"]["request"]["url"] for m in self.browser._backlog
                if m.get("method") == "Network.requestWillBeSent"]

    def screenshot(self, png: Path) -> None:
        png.write_bytes(base64.b64decode(self.browser.call("Page.captureScreenshot", self.tab, format="png")["data"]))

    def close(self) -> None:
        self.browser.close()


def page_answers(page: Page, texts: list[str]) -> list[dict]:
    """Per text, the page's token ids and its answer: {label, score, scores} of a classifier, {vector} of an embedder,
    {entities} of a token classifier."""
    return page.run(f"""(async () => {{
        const model = await window.edgetl.ready;
        const out = [];
        for (const text of {json.dumps(texts)}) {{
            const answer = model.embed ? {{vector: await model.embed(text)}} : await model.predict(text);
            out.push({{ids: model.encode(text), ...answer}});
        }}
        return out;
    }})()""")


def page_times(page: Page, texts: list[str]) -> list[float]:
    return page.run(f"""(async () => {{
        const model = await window.edgetl.ready;
        const ms = [];
        for (const text of {json.dumps(texts)}) {{
            const start = performance.now();
            await (model.embed ? model.embed(text) : model.predict(text));
            ms.push(performance.now() - start);
        }}
        return ms;
    }})()""")


def runtime_answers(runtime, texts: list[str]) -> list:
    """The Python runtime's answers to ``texts``; a token classifier's to their whitespace-separated words, as the
    page tags them."""
    if runtime.task == "token-classification":
        return runtime.predict_words([text.split() for text in texts])
    return runtime.predict(texts)


def native_times(runtime, texts: list[str]) -> list[float]:
    ms = []
    for text in texts:
        start = time.perf_counter()
        runtime_answers(runtime, [text])
        ms.append((time.perf_counter() - start) * 1e3)
    return ms


def labels(answer) -> str | list:
    """What must be equal: a classifier's label, or a token classifier's entities as (type, start, end)."""
    if isinstance(answer, dict):
        return answer.get("label") or [(e["type"], e["start"], e["end"]) for e in answer["entities"]]
    return answer.label if hasattr(answer, "label") else [(e.type, e.start, e.end) for e in answer]


def gaps(answers: list, expected: list) -> list[float]:
    """Per text, the largest difference between two answers: of a label's probability, of a vector's value, or of
    an entity's score (0 where the entities differ: ``labels`` counts those)."""
    return [max((abs(x - y) for x, y in zip(_values(a), _values(e), strict=True)), default=0.0)
            if len(_values(a)) == len(_values(e)) else 0.0 for a, e in zip(answers, expected, strict=True)]


def _values(answer) -> list[float]:
    """A classifier's probabilities (in label order), an embedder's vector or a token classifier's entity scores,
    from the page's JSON or the runtime."""
    if isinstance(answer, dict):
        if "entities" in answer:
            return [e["score"] for e in answer["entities"]]
        return answer["vector"] if "vector" in answer else list(answer["scores"].values())
    if isinstance(answer, list):  # a token classifier's entities
        return [e.score for e in answer]
    return list(answer.scores.values()) if hasattr(answer, "scores") else [float(x) for x in answer]


def lowest_cosine(answers: list[dict], expected: list) -> float:
    import numpy as np

    page, runtime = np.array([a["vector"] for a in answers]), np.stack(expected)
    cosines = (page * runtime).sum(1) / (np.linalg.norm(page, axis=1) * np.linalg.norm(runtime, axis=1))
    return float(cosines.min())


def unfused(runtime, texts: list[str]) -> list:
    """The runtime's predictions with ONNX Runtime's graph optimizations off: the model's operators as written,
    none of the fused x86 kernels the runtime otherwise runs; how far these move is the model's own spread."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    fused = runtime.engine.session
    model = runtime.folder / runtime.manifest["models"][runtime.backend]["path"]
    runtime.engine.session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    try:
        return runtime_answers(runtime, texts)
    finally:
        runtime.engine.session = fused


def beyond(values: list[float]) -> dict:
    return {"largest": max(values), "beyond_tolerance": sum(v > PROBABILITY_TOLERANCE for v in values)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("page", type=Path, help="the folder edgetl export-web wrote for BUNDLE")
    parser.add_argument("--texts", type=Path, default=DEV)
    parser.add_argument("--field", default="text", help="the field of a .jsonl --texts file (STS-B: sentence1)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--png", type=Path)
    parser.add_argument("--rounds", type=int, default=0, help="timing rounds (0: agreement only)")
    parser.add_argument("--backend", choices=["auto", "wasm", "webgpu"], default="auto",
                        help="what the page runs the model on (its ?backend=)")
    parser.add_argument("--chromium")
    parser.add_argument("--timeout", type=float, default=900, help="seconds for the whole browser session")
    args = parser.parse_args()

    from edgetl.runtime import load
    from edgetl.web import page_server

    texts, gold = read_texts(args.texts, args.field)
    runtime = load(args.bundle, backend="onnxruntime")
    tagger = runtime.task == "token-classification"
    server = page_server(args.page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    origin = f"http://127.0.0.1:{server.server_address[1]}/"
    page = Page(find_chromium(args.chromium), f"{origin}index.html?backend={args.backend}", args.timeout,
                webgpu=args.backend != "wasm")
    try:
        start = time.perf_counter()
        loaded = page.run("window.edgetl.ready.then((c) => ({isolated: self.crossOriginIsolated, backend: c.backend}), "
                          "() => ({error: document.getElementById('status').textContent}))")
        load_s = time.perf_counter() - start
        if "error" in loaded:  # the page's own message, as a person would read it
            print(json.dumps({"page": str(args.page), "error": loaded["error"]}))
            return 2
        if args.png:
            page.screenshot(args.png)
        answers = page_answers(page, texts)
        expected = runtime_answers(runtime, texts)
        inputs = [text.split() for text in texts] if tagger else texts
        python_ids = [e.ids for e in runtime.tokenizer.encode_batch(inputs, is_pretokenized=tagger)]
        id_mismatch = [i for i, a in enumerate(answers) if a["ids"] != python_ids[i]]
        embedding = runtime.task == "sentence-embedding"
        label_mismatch = [] if embedding else [i for i, (a, e) in enumerate(zip(answers, expected, strict=True))
                                               if labels(a) != labels(e)]
        page_gaps = gaps(answers, expected)
        gap = max(page_gaps)
        plain = unfused(runtime, texts)
        spread = {"runtime_vs_unfused": beyond(gaps(expected, plain)), "page_vs_unfused": beyond(gaps(answers, plain)),
                  "labels_runtime_vs_unfused": 0 if embedding else sum(labels(e) != labels(p)
                                                                       for e, p in zip(expected, plain, strict=True))}
        rounds = []
        for r in range(args.rounds):
            blocks = [("browser", lambda: page_times(page, texts)), ("native", lambda: native_times(runtime, texts))]
            row = {}
            for name, timed in (blocks if r % 2 == 0 else blocks[::-1]):
                row[f"{name}_p50_ms"] = round(statistics.median(timed()), 3)
            row["order"] = "browser, native" if r % 2 == 0 else "native, browser"
            row["browser_over_native"] = round(row["browser_p50_ms"] / row["native_p50_ms"], 2)
            rounds.append(row)
        outside = [url for url in page.requests() if not url.startswith(origin)]
    finally:
        page.close()
        server.shutdown()
    weights = json.loads((args.page / "vendor" / "packages.json").read_text())
    page_files = [p for p in args.page.rglob("*") if p.is_file() and p.parent.name != "vendor"]
    fetched = {url.removeprefix(origin).split("?")[0] for url in page.requests() if url.startswith(origin)}
    report = {
        "bundle": str(args.bundle), "page": str(args.page), "chromium": page.version, "machine": platform.processor()
        or platform.machine(), "texts": len(texts), "texts_file": str(args.texts), "cross_origin_isolated":
        loaded["isolated"], "backend": loaded["backend"], "load_s": round(load_s, 2), "token_ids_differ": len(id_mismatch),
        "task": runtime.task, "labels_differ": len(label_mismatch),
        f"largest_{'vector_value' if embedding else 'probability'}_difference": gap,
        **({"lowest_cosine": lowest_cosine(answers, expected)} if embedding else {}),
        "probabilities_beyond_tolerance": sum(g > PROBABILITY_TOLERANCE for g in page_gaps),
        "onnxruntime_without_graph_optimizations": spread,
        **({"entities": {"page": sum(len(a["entities"]) for a in answers),
                         "runtime": sum(len(e) for e in expected)}} if tagger else {}),
        "accuracy": None if gold is None or embedding or tagger else {
            "page": sum(runtime.labels.index(a["label"]) == g for a, g in zip(answers, gold, strict=True)) / len(gold),
            "runtime": sum(runtime.labels.index(e.label) == g for e, g in zip(expected, gold, strict=True)) / len(gold)},
        "requests_outside_the_page": outside, "page_bytes": sum(p.stat().st_size for p in page_files),
        "runtime_bytes": sum(p.stat().st_size for p in (args.page / "vendor").iterdir() if f"vendor/{p.name}" in fetched),
        "packages": weights,
        "timing_rounds": rounds,
        "first_differences": [{"text": texts[i], "page": answers[i]["ids"], "python": python_ids[i]}
                              for i in id_mismatch[:3]],
    }
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    problems = [what for failed, what in [
        (id_mismatch, f"{len(id_mismatch)} texts tokenized differently"),
        (label_mismatch, f"{len(label_mismatch)} labels differ"),
        (gap > PROBABILITY_TOLERANCE, f"{'vectors' if embedding else 'probabilities'} differ by {gap:.2e} "
                                      f"(tolerance {PROBABILITY_TOLERANCE})"),
        (outside, f"the page requested {outside[:3]}"),
    ] if failed]
    if problems:
        sys.exit("web_page: FAILED: " + "; ".join(problems))
    return 0


if __name__ == "__main__":
    sys.exit(main())
