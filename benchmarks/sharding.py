"""Sharded against whole, on this machine: outputs, batch-1 latency, throughput on a stream, peak memory per process.

    python benchmarks/sharding.py RUN --texts FILE [--parts 2 3] [--max-part-mb MB] [--rounds 2] [--max-texts 300]
        [--parity-texts N] --out DIR

RUN is a finished recipe run: its bundle (the INT8 models) and, rebuilt as a bundle of the same tokenizer and
manifest, its export stage's FP32 models. Each is sharded with ``edgetl.sharding.shard_bundle`` into every count of
``--parts``, on both formats (each part's file under ``--max-part-mb`` if given). Outputs: every text of FILE
(the first ``--parity-texts``) (a .tsv with a header, first column; or .jsonl with
"tokens" or "text") through the whole model and each sharded one, one text per call, max absolute difference
and the share of equal argmax answers. Timing: each configuration in its own process, rounds in alternating order,
the first ``--max-texts`` texts: whole model with 2 threads and with 1, and the parts one core each in worker
processes; p50 of one text per call (``edgetl.bench.measure.timed_calls``), texts per second when all of them are
sent at once (the pipeline keeps every part busy), and the peak resident memory (VmHWM) of the process that holds
each model or part. Writes DIR/sharding.json and DIR/sharding.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
BACKENDS = {"onnx": "onnxruntime", "openvino": "openvino"}


def read_texts(path: Path) -> list[str]:
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [" ".join(r["tokens"]) if "tokens" in r else r["text"] for r in rows]
    return [line.split("\t")[0] for line in path.read_text().splitlines()[1:] if line.strip()]


def fp32_bundle(run: Path, out: Path) -> Path:
    """The run's bundle with its export stage's FP32 models in place of the INT8 ones."""
    from edgetl.artifact import file_table, write_json_atomic

    bundle = next(run.glob("[0-9][0-9]-bundle"))
    export = next(run.glob("[0-9][0-9]-export"))
    shutil.copytree(bundle, out)
    manifest = json.loads((out / "edgetl.json").read_text())
    for name, entry in manifest["models"].items():
        source = export / Path(entry["path"])
        for suffix in [".onnx"] if name == "onnx" else [".xml", ".bin"]:
            shutil.copy2(source.with_suffix(suffix), out / Path(entry["path"]).with_suffix(suffix))
        entry["precision"] = "fp32"
    manifest["files"] = {k: v for k, v in file_table(out).items() if k != "edgetl.json"}
    write_json_atomic(out / "edgetl.json", manifest)
    return out


def peak_rss_mb(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def time_one(spec: dict) -> dict:
    """One configuration, in this process: batch-1 latencies, then the whole stream at once."""
    from edgetl.bench.measure import latency_summary, timed_calls
    from edgetl.runtime import load
    from edgetl.runtime.text import pad

    runtime = load(spec["bundle"], backend=BACKENDS[spec["backend"]], threads=spec["threads"])
    feeds = [pad([e]) for e in runtime.tokenizer.encode_batch(spec["texts"])]
    latency = latency_summary(timed_calls(runtime.engine, feeds, warmup=10))
    run_many = getattr(runtime.engine, "run_many", lambda fs: map(runtime.engine.run, fs))
    start = time.perf_counter()
    for _ in run_many(feeds):
        pass
    seconds = time.perf_counter() - start
    workers = [peak_rss_mb(p.pid) for p in getattr(runtime.engine, "_processes", [])]
    return {**latency, "texts_per_s": round(len(feeds) / seconds, 2), "peak_rss_mb": round(peak_rss_mb(), 1),
            "worker_peak_rss_mb": [round(w, 1) for w in workers]}


def outputs(bundle: Path, backend: str, texts: list[str]) -> np.ndarray:
    from edgetl.runtime import load
    from edgetl.runtime.text import pad

    runtime = load(bundle, backend=BACKENDS[backend])
    out = [runtime.engine.run(pad([e])) for e in runtime.tokenizer.encode_batch(texts)]
    if hasattr(runtime.engine, "close"):
        runtime.engine.close()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", nargs="?")
    parser.add_argument("--texts")
    parser.add_argument("--parts", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-texts", type=int, default=300)
    parser.add_argument("--parity-texts", type=int)
    parser.add_argument("--max-part-mb", type=float)
    parser.add_argument("--out")
    parser.add_argument("--time", help=argparse.SUPPRESS)  # a timing process: SPEC.json
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    if args.time:
        print(json.dumps(time_one(json.loads(Path(args.time).read_text()))))
        return 0
    from edgetl.bench.machine import describe, machine_info
    from edgetl.sharding import shard_bundle

    run, out = Path(args.run), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    texts = read_texts(Path(args.texts))
    work = Path(tempfile.mkdtemp(prefix="sharding-", dir=out.parent))
    variants = {"int8": next(run.glob("[0-9][0-9]-bundle")), "fp32": fp32_bundle(run, work / "fp32")}
    result = {"run": str(run), "texts": str(args.texts), "machine": describe(machine_info()),
              "command": "python benchmarks/sharding.py " + " ".join(sys.argv[1:]), "parity": [], "timing": [],
              "parts": {}}
    sharded = {}
    for precision, bundle in variants.items():
        for parts in args.parts:
            folder = work / f"{precision}-{parts}"
            models = shard_bundle(bundle, folder, parts, max_part_mb=args.max_part_mb, log=lambda m: print(m, flush=True))
            sharded[precision, parts] = folder
            result["parts"][f"{precision}-{parts}"] = {b: [{k: p[k] for k in ("layers", "bytes", "layer_ms")}
                                                           for p in m["parts"]] for b, m in models.items()}
        for backend in BACKENDS:
            whole = outputs(bundle, backend, texts[: args.parity_texts])
            for parts in args.parts:
                got = outputs(sharded[precision, parts], backend, texts[: args.parity_texts])
                diff = max(float(np.abs(a - b).max()) for a, b in zip(got, whole, strict=True))
                same = np.mean([np.array_equal(a.argmax(-1), b.argmax(-1)) for a, b in zip(got, whole, strict=True)])
                result["parity"].append({"precision": precision, "backend": backend, "parts": parts, "texts": len(got),
                                         "max_abs_diff": diff, "same_answers": round(float(same), 6)})
                print(result["parity"][-1], flush=True)
    configs = [{"precision": p, "backend": b, "parts": 1, "threads": t, "bundle": str(variants[p])}
               for p in variants for b in BACKENDS for t in (2, 1)]
    configs += [{"precision": p, "backend": b, "parts": n, "threads": 1, "bundle": str(sharded[p, n])}
                for p in variants for b in BACKENDS for n in args.parts]
    for round_index in range(args.rounds):
        for config in configs if round_index % 2 == 0 else configs[::-1]:
            spec = work / "spec.json"
            spec.write_text(json.dumps({**config, "texts": texts[: args.max_texts]}))
            done = subprocess.run([sys.executable, __file__, "--time", str(spec)], capture_output=True, text=True,
                                  check=True)
            row = {**{k: v for k, v in config.items() if k != "bundle"}, "round": round_index,
                   **json.loads(done.stdout.strip().splitlines()[-1])}
            result["timing"].append(row)
            print(row, flush=True)
    (out / "sharding.json").write_text(json.dumps(result, indent=1))
    (out / "sharding.md").write_text(markdown(result))
    shutil.rmtree(work)
    print((out / "sharding.md").read_text())
    return 0


def markdown(result: dict) -> str:
    lines = [f"# Sharded against whole: {result['run']}", "", f"Machine: {result['machine']}.",
             f"Command: `{result['command']}`.", "",
             "| precision | backend | parts | texts | max abs difference | same answers |", "|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r['precision']} | {r['backend']} | {r['parts']} | {r['texts']} | {r['max_abs_diff']:.2e} | "
              f"{r['same_answers']:.4f} |" for r in result["parity"]]
    lines += ["", "Per round: batch-1 p50 (ms), texts/s with every text sent at once, peak resident memory of the "
              "process holding the model (MB; for parts, each worker's).", "",
              "| precision | backend | model | p50 ms (rounds) | texts/s (rounds) | peak MB |", "|---|---|---|---|---|---|"]
    keys = dict.fromkeys((r["precision"], r["backend"], r["parts"], r["threads"]) for r in result["timing"])
    for key in keys:
        rows = [r for r in result["timing"] if (r["precision"], r["backend"], r["parts"], r["threads"]) == key]
        name = f"whole, {key[3]} thread{'s' if key[3] > 1 else ''}" if key[2] == 1 else f"{key[2]} parts x 1 core"
        memory = rows[0]["worker_peak_rss_mb"] or [rows[0]["peak_rss_mb"]]
        p50 = " / ".join(f"{r['p50_ms']:.2f}" for r in rows)
        rate = " / ".join(f"{r['texts_per_s']:.1f}" for r in rows)
        lines.append(f"| {key[0]} | {key[1]} | {name} | {p50} | {rate} | {' + '.join(f'{m:.0f}' for m in memory)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
