"""edgetl command line: run / validate recipes, print the support matrix, benchmark artifacts, predict with a bundle."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from edgetl.errors import EdgetlError, UsageError

log = logging.getLogger("edgetl")


def _cmd_run(args) -> int:
    from edgetl.pipeline import run_recipe
    from edgetl.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    artifacts = run_recipe(recipe, Path(args.run_dir) if args.run_dir else None, from_stage=args.from_stage)
    log.info("recipe %s finished: %s", recipe.name, artifacts[-1].path)
    return 0


def _cmd_validate(args) -> int:
    from edgetl.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    print(f"{args.recipe}: valid ({len(recipe.stages)} stages: {' -> '.join(s.stage for s in recipe.stages)})")
    return 0


def _cmd_support(args) -> int:
    from edgetl.support import support_matrix, write_readme

    if args.write is None:
        print(support_matrix(), end="")
    else:
        print(f"{args.write}: {'updated' if write_readme(Path(args.write)) else 'already up to date'}")
    return 0


def _bench_inputs(paths: list[str]):
    """Model artifacts of the given artifact, bundle or run folders, and the data config of their run."""
    from edgetl.artifact import MODEL_KINDS, Artifact
    from edgetl.recipe import DataConfig, Recipe

    artifacts, data = [], None
    for name in paths:
        path = Path(name)
        if (path / "manifest.json").is_file():
            found, run_dir = [Artifact.load(path)], path.parent
        elif path.is_dir() and any((p / "manifest.json").is_file() for p in path.iterdir()):
            # A run's bundle holds the same model as its quantize stage: time it once.
            found = [a for a in (Artifact.load(p) for p in sorted(path.iterdir()) if (p / "manifest.json").is_file())
                     if a.kind in MODEL_KINDS]
            run_dir = path
        else:
            raise UsageError(f"{path}: neither an artifact folder, a bundle nor a run folder")
        models = [a for a in found if a.kind in (*MODEL_KINDS, "bundle")]
        if not models:
            raise UsageError(f"{path}: no model artifacts to benchmark")
        if len(paths) > 1:
            models = [Artifact(a.path, a.manifest, label=f"{run_dir.name}/{a.path.name}") for a in models]
        artifacts += models
        resolved = run_dir / "recipe.resolved.yaml"
        if data is None and resolved.is_file():
            import yaml

            data = Recipe.model_validate(yaml.safe_load(resolved.read_text())).data
    return artifacts, data or DataConfig()


def _int_list(text: str, name: str, allow_own: bool = False) -> list:
    values = []
    for item in text.split(","):
        item = item.strip()
        if allow_own and item == "own":
            values.append(None)
        elif item.isdigit() and (int(item) > 0 or name == "--threads"):
            values.append(int(item) or None)
        else:
            raise UsageError(f"{name}: {item!r} is not a positive integer{' or own' if allow_own else ''}")
    return values


def _cmd_bench(args) -> int:
    if args.targets[0] == "merge":
        from edgetl.bench.merge import load_results, merge

        if len(args.targets) < 2:
            raise UsageError("bench merge: give one or more results.json files")
        written = merge(load_results([Path(p) for p in args.targets[1:]]), Path(args.out))
        print("wrote " + ", ".join(str(p) for p in written.values()))
        return 0
    from edgetl.bench.machine import machine_info
    from edgetl.bench.sweep import benchmark_sweep
    from edgetl.data import load_evaluation, load_labelled

    batch_sizes = _int_list(args.batch_sizes, "--batch-sizes")
    seq_lengths = _int_list(args.seq_lengths, "--seq-lengths", allow_own=True)
    threads = _int_list(args.threads, "--threads")
    artifacts, data = _bench_inputs(args.targets)
    train, dev = load_labelled(data)[0], load_evaluation(data)
    texts = list(dev["text"])[: args.max_sentences]
    machine = machine_info()
    threads_text = "default threads" if args.threads == "0" else f"{args.threads} threads"
    label = args.label or f"{machine['cpu']}, {machine['usable_cores']} cores, {threads_text}"
    labels = None if args.no_accuracy else list(dev["label"])[: len(texts)]
    train_texts = list(train.shuffle(seed=1).select(range(min(300, len(train))))["text"])
    result = benchmark_sweep(
        artifacts, texts, labels, train_texts, out_dir=Path(args.out), title=" ".join(args.targets), label=label,
        batch_sizes=batch_sizes, seq_lengths=seq_lengths, threads=threads, rounds=args.rounds, warmup=args.warmup,
        max_calls=args.max_calls, noise_threshold=args.noise_threshold, peak_gflops=args.peak_gflops,
        max_length=data.max_length, peers=not args.no_peers and not args.only_gpu,
        gpu="only" if args.only_gpu else not args.no_gpu, pt2e=not args.no_pt2e)
    from edgetl.bench.merge import merge

    written = merge([result], Path(args.out))
    print(f"wrote {args.out}/results.json, " + ", ".join(str(p) for p in written.values()))
    return 0


def _cmd_predict(args) -> int:
    from edgetl.runtime import TextClassifier

    if bool(args.texts) == bool(args.input):
        raise UsageError("predict: give texts on the command line or --input FILE.jsonl, not both or neither")
    if args.output and not args.input:
        raise UsageError("predict: --output goes with --input")
    classifier = TextClassifier.load(args.bundle, backend=args.backend, threads=args.threads)
    if args.input:
        return _predict_file(classifier, Path(args.input), Path(args.output) if args.output else None)
    for text, pred in zip(args.texts, classifier.predict(args.texts), strict=True):
        print(f"{pred.label}\t{pred.score:.4f}\t{text}")
    return 0


def _cmd_serve(args) -> int:
    from edgetl.runtime import TextClassifier
    from edgetl.runtime.server import serve

    classifier = TextClassifier.load(args.bundle, backend=args.backend, threads=args.threads)
    limits = {k: v for k, v in (("max_body_bytes", args.max_body_bytes), ("max_texts", args.max_texts)) if v is not None}
    serve(classifier, args.host, args.port, max_batch=args.max_batch, **limits)
    return 0


def read_jsonl_texts(path: Path, field: str = "text") -> list[str]:
    """Texts of a JSONL file: one JSON object with a string ``field``, or one JSON string, per line."""
    if not path.is_file():
        raise UsageError(f"--input: file not found: {path}")
    texts = []
    with open(path, encoding="utf-8", errors="strict") as handle:
        try:
            lines = handle.read().splitlines()
        except UnicodeDecodeError as exc:
            raise UsageError(f"--input: {path} is not UTF-8 ({exc})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"--input: {path}:{number}: not valid JSON ({exc.msg})") from None
        text = row.get(field) if isinstance(row, dict) else row
        if not isinstance(text, str):
            raise UsageError(f"--input: {path}:{number}: expected a string or an object with a string '{field}'")
        texts.append(text)
    return texts


def _predict_file(classifier, source: Path, target: Path | None, chunk: int = 256) -> int:
    """Predictions for every line of ``source``, written as JSONL to ``target`` (atomically) or stdout."""
    from tqdm import tqdm

    texts = read_jsonl_texts(source)
    rows = []
    with tqdm(total=len(texts), desc="predict", unit="text", disable=target is None) as progress:
        for start in range(0, len(texts), chunk):
            batch = texts[start:start + chunk]
            for text, pred in zip(batch, classifier.predict(batch), strict=True):
                rows.append(json.dumps({"text": text, "label": pred.label, "score": pred.score, "scores": pred.scores},
                                       ensure_ascii=False))
            progress.update(len(batch))
    if target is None:
        print("\n".join(rows))
        return 0
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text("".join(f"{row}\n" for row in rows), encoding="utf-8")
    os.replace(tmp, target)  # a reader never sees half a file
    print(f"wrote {len(rows)} predictions to {target}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgetl", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a recipe (resumes after the last finished stage)")
    run.add_argument("recipe", help="shipped recipe name (sst-int8) or a YAML path")
    run.add_argument("overrides", nargs="*", help="key.path=value, e.g. stages.finetune.epochs=1")
    run.add_argument("--from", dest="from_stage", help="rerun from this stage on, even if finished")
    run.add_argument("--run-dir", help="artifact folder (default: runs/<recipe name>)")
    run.set_defaults(func=_cmd_run)

    validate = sub.add_parser("validate", help="check a recipe and its stage chain without running it")
    validate.add_argument("recipe")
    validate.add_argument("overrides", nargs="*")
    validate.set_defaults(func=_cmd_validate)

    support = sub.add_parser("support", help="print the support matrix (tasks x stages, architectures) generated "
                                             "from the declarations; --write README.md updates README's copy")
    support.add_argument("--write", metavar="FILE", help="replace the block between the support-matrix markers in FILE")
    support.set_defaults(func=_cmd_support)

    bench = sub.add_parser("bench", help="benchmark artifacts, bundles or runs: backends x threads x batch x length; "
                                         "'bench merge FILE...' combines results.json files into one table")
    bench.add_argument("targets", nargs="+", help="artifact, bundle or run folders (or: merge RESULTS.json ...)")
    bench.add_argument("--out", default="bench-results", help="output folder (default: bench-results)")
    bench.add_argument("--label", help="machine label for merged tables (default: CPU, cores, threads)")
    bench.add_argument("--batch-sizes", default="1,32", help="comma-separated (default: 1,32)")
    bench.add_argument("--seq-lengths", default="own,128",
                       help="'own' (evaluation texts at their own length) and/or padded lengths (default: own,128)")
    bench.add_argument("--threads", default="0", help="comma-separated intra-op thread counts; 0 = runtime default")
    bench.add_argument("--rounds", type=int, default=3, help="timed blocks per cell; block order alternates")
    bench.add_argument("--warmup", type=int, default=10, help="untimed calls before each block")
    bench.add_argument("--max-calls", type=int, default=300, help="timed calls per block")
    bench.add_argument("--max-sentences", type=int, help="evaluation texts used (default: all)")
    bench.add_argument("--noise-threshold", type=float, default=0.10,
                       help="flag a cell noisy when its per-round p50s spread by more than this fraction")
    bench.add_argument("--peak-gflops", type=float, help="the machine's peak GFLOP/s, to report the fraction reached")
    bench.add_argument("--no-peers", action="store_true", help="skip the Optimum and OpenVINO default INT8 models")
    bench.add_argument("--no-pt2e", action="store_true",
                       help="skip PyTorch INT8 through Neural Compressor's PT2E path (compiles each model in each round)")
    bench.add_argument("--no-gpu", action="store_true", help="skip GPU backends even where present")
    bench.add_argument("--only-gpu", action="store_true",
                       help="time only the GPU variants of the models (none, with a note each, without a GPU)")
    bench.add_argument("--no-accuracy", action="store_true", help="skip accuracy on the evaluation split")
    bench.set_defaults(func=_cmd_bench)

    predict = sub.add_parser("predict", help="classify texts with a bundle (torch-free)")
    predict.add_argument("bundle")
    predict.add_argument("texts", nargs="*")
    predict.add_argument("--input", help="JSONL file: one {\"text\": ...} object or JSON string per line")
    predict.add_argument("--output", help="JSONL file for the predictions (default: stdout)")
    predict.add_argument("--backend", default="auto", choices=["auto", "onnxruntime", "openvino"])
    predict.add_argument("--threads", type=int)
    predict.set_defaults(func=_cmd_predict)

    serve = sub.add_parser("serve", help="serve a bundle over HTTP: POST /predict, GET /health, GET /metadata")
    serve.add_argument("bundle")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    serve.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed at start)")
    serve.add_argument("--backend", default="auto", choices=["auto", "onnxruntime", "openvino"])
    serve.add_argument("--threads", type=int)
    serve.add_argument("--max-batch", type=int, default=64, help="texts per batch across concurrent requests")
    serve.add_argument("--max-body-bytes", type=int, help="larger requests get 413 (default: 1 MiB)")
    serve.add_argument("--max-texts", type=int, help="texts per request; more get 413 (default: 1024)")
    serve.set_defaults(func=_cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # edgetl's own progress at INFO; the libraries underneath (ONNX Runtime's quantizer logs every tensor
    # at INFO) only from WARNING up.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    log.setLevel(logging.INFO)
    # torchao (pulled in by transformers) registers enums in a way torch now warns about on every import.
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    try:
        return args.func(args)
    except EdgetlError as exc:
        if args.debug:
            raise
        print(f"edgetl: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
