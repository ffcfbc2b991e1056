"""A model no process may hold whole, run sharded under an OS-enforced per-process memory cap.

    python benchmarks/memory_cap.py BUNDLE --cap MB --texts FILE [--parts 2] [--max-texts 50] [--max-new-tokens 16]
        --out DIR

BUNDLE is a text-classification bundle (``edgetl run benchmarks/memory_cap.yaml``: SmolLM2-135M, FP32). It is
sharded into ``--parts`` parts (``edgetl shard``), then for each backend ``edgetl predict`` classifies the first
``--max-texts`` texts of FILE (a .tsv with a header, first column) three ways: the whole bundle with no cap (the
reference), the whole bundle under ``edgetl --memory-mb MB``, and the sharded bundle under the same cap (the cap
holds for the CLI's process and for each part's worker process, which inherit it). Records each command's exit
code and last error line, how many labels and the largest probability difference between the sharded answers and
the reference, and each part's model file size. A text-generation bundle (``benchmarks/memory_cap_generation.yaml``)
is run with ``edgetl generate`` instead, one process per text (its first eight words as the prompt, greedy,
``--max-new-tokens``), and the sharded texts are compared with the reference's.
Writes DIR/memory_cap.json and DIR/memory_cap.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

BACKENDS = {"onnx": "onnxruntime", "openvino": "openvino"}


def edgetl(cap: int | None, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    """``edgetl [--memory-mb cap] ARGS`` in a subprocess, and what the results record of it."""
    command = ["edgetl", *(["--memory-mb", str(cap)] if cap else []), *args]
    done = subprocess.run([sys.executable, "-m", *command], capture_output=True, text=True, timeout=1800)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    return done, {"command": " ".join(command), "returncode": done.returncode,
                  "last_line": lines[-1][:400] if lines else ""}


def predict(bundle: Path, backend: str, texts: Path, out: Path, cap: int | None) -> dict:
    return edgetl(cap, "predict", str(bundle), "--input", str(texts), "--output", str(out),
                  "--backend", BACKENDS[backend])[1]


def generate(bundle: Path, backend: str, prompts: list[str], out: Path, cap: int | None, tokens: int) -> dict:
    """``edgetl generate`` of each prompt (stopping at the first failure); the texts go to ``out`` as JSONL rows."""
    rows = []
    for prompt in prompts:
        done, record = edgetl(cap, "generate", str(bundle), prompt, "--max-new-tokens", str(tokens),
                              "--backend", BACKENDS[backend])
        if done.returncode != 0:
            return record
        rows.append({"prompt": prompt, "text": done.stdout})
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {**record, "last_line": f"{len(rows)} texts"}


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle")
    parser.add_argument("--cap", type=int, required=True, help="edgetl --memory-mb for the capped commands")
    parser.add_argument("--texts", required=True)
    parser.add_argument("--parts", type=int, default=2)
    parser.add_argument("--max-texts", type=int, default=50)
    parser.add_argument("--max-new-tokens", type=int, default=16, help="a text-generation bundle's new tokens per text")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    from edgetl.bench.machine import describe, machine_info
    from edgetl.sharding import shard_bundle

    bundle, out = Path(args.bundle), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [line.split("\t")[0] for line in Path(args.texts).read_text().splitlines()[1:] if line.strip()]
    generation = json.loads((bundle / "edgetl.json").read_text()).get("task") == "text-generation"
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        texts = scratch / "texts.jsonl"
        texts.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows[:args.max_texts]))
        sharded = scratch / "sharded"
        models = shard_bundle(bundle, sharded, args.parts, log=lambda m: print(m, flush=True))
        results = {"bundle": str(bundle), "cap_mb": args.cap, "parts": args.parts, "texts": min(len(rows), args.max_texts),
                   "machine": describe(machine_info()), "backends": {}}
        for backend in models:
            row = {"whole_model_mb": round(models[backend]["sharded_from"]["bytes"] / 1e6, 1),
                   "part_mb": [round(p["bytes"] / 1e6, 1) for p in models[backend]["parts"]]}
            for name, folder, cap in (("whole", bundle, None), ("whole_capped", bundle, args.cap),
                                      ("sharded_capped", sharded, args.cap)):
                target = scratch / f"{backend}-{name}.jsonl"
                row[name] = (generate(folder, backend, [" ".join(t.split()[:8]) for t in rows[:args.max_texts]], target,
                                      cap, args.max_new_tokens) if generation
                             else predict(folder, backend, texts, target, cap))
                print(backend, name, row[name]["returncode"], row[name]["last_line"], flush=True)
            reference, capped = (read_rows(scratch / f"{backend}-{n}.jsonl") for n in ("whole", "sharded_capped"))
            if reference and capped and generation:
                row["sharded_same_texts"] = sum(a["text"] == b["text"] for a, b in zip(reference, capped, strict=True))
            elif reference and capped:
                row["sharded_same_labels"] = sum(a["label"] == b["label"] for a, b in zip(reference, capped, strict=True))
                row["sharded_max_prob_diff"] = max(abs(a["scores"][k] - b["scores"][k])
                                                   for a, b in zip(reference, capped, strict=True) for k in a["scores"])
            results["backends"][backend] = row
    (out / "memory_cap.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [f"# Under a {args.cap} MB per-process cap (`edgetl --memory-mb {args.cap}`, RLIMIT_DATA)", "",
             f"Machine: {results['machine']}. {results['texts']} texts; the sharded bundle has {args.parts} parts, each in its own "
             "worker process under the same cap.", "",
             "| backend | whole model file | part files | whole, no cap | whole, capped | sharded, capped | "
             "sharded vs whole uncapped |", "|---|---:|---|---|---|---|---|"]
    for backend, row in results["backends"].items():
        def outcome(r):
            return "ran" if r["returncode"] == 0 else f"exit {r['returncode']}: {r['last_line'][:120]}"
        lines.append(f"| {backend} | {row['whole_model_mb']} MB | {' + '.join(f'{m} MB' for m in row['part_mb'])} | "
                     f"{outcome(row['whole'])} | {outcome(row['whole_capped'])} | {outcome(row['sharded_capped'])} | "
                     + (f"{row['sharded_same_labels']} / {results['texts']}, {row['sharded_max_prob_diff']:.2g} |"
                        if "sharded_same_labels" in row else
                        f"{row['sharded_same_texts']} / {results['texts']} texts equal |" if "sharded_same_texts" in row
                        else "n/a |"))
    (out / "memory_cap.md").write_text("\n".join(lines) + "\n")
    print((out / "memory_cap.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
