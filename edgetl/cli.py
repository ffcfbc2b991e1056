"""edgetl command line: run / validate recipes, report on a run, print the support matrix, benchmark artifacts,
predict with a bundle or embed texts with one, serve it, put it in a web page, sign it."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from edgetl.errors import EdgetlError, UsageError

log = logging.getLogger("edgetl")


def _cmd_run(args) -> int:
    import time

    from edgetl.pipeline import run_recipe
    from edgetl.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    started = time.time()
    artifacts = run_recipe(recipe, Path(args.run_dir) if args.run_dir else None, from_stage=args.from_stage)
    log.info("recipe %s finished: %s", recipe.name, artifacts[-1].path)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one table, not one per process
        from edgetl.report import run_summary

        print(run_summary(artifacts, since=started), flush=True)
    return 0


def _floats(text: str | None, flag: str) -> tuple | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"{flag}: give comma-separated numbers, e.g. 0.5,0.75,1 (got {text!r})") from None


def _settings(text: str, flag: str) -> dict:
    """``onnx_method=static,smooth_alpha=0.5`` -> ``{"onnx_method": "static", "smooth_alpha": 0.5}``."""
    import yaml

    pairs = [part.partition("=") for part in text.split(",")]
    if not text or any(not key or not sep for key, sep, _ in pairs):
        raise UsageError(f"{flag}: give key=value pairs of the quantize stage, comma-separated, e.g. "
                         f"onnx_method=static,smooth_alpha=0.5 (got {text!r})")
    return {key.strip(): yaml.safe_load(value) for key, _, value in pairs}


def _cmd_search(args) -> int:
    from edgetl.artifact import Artifact
    from edgetl.recipe import load_recipe
    from edgetl.search import Goal, Options, Searcher

    if args.budget_ms is None and args.budget_ratio is None and args.min_accuracy is None and args.max_drop is None:
        raise UsageError("search: give a budget (--budget-ms or --budget-ratio, optionally --max-size-mb) for the most "
                         "accurate model within it, or only a floor (--min-accuracy or --max-drop) for the fastest "
                         "model at or above it")
    recipe = load_recipe(args.recipe, args.overrides)
    rungs = _floats(args.rungs, "--rungs")
    if rungs is not None and (sorted(rungs) != list(rungs) or rungs[-1] != 1 or rungs[0] <= 0):
        raise UsageError(f"--rungs: increasing fractions of the training ending at 1, e.g. 0.125,0.5,1 (got {args.rungs})")
    goal = Goal(budget_ms=args.budget_ms, budget_ratio=args.budget_ratio, max_size_mb=args.max_size_mb,
                min_accuracy=args.min_accuracy, max_drop=args.max_drop, max_int8_drop=args.max_int8_drop)
    if args.engine == "local" and (args.workers is not None or args.threads is not None):
        raise UsageError("search: --workers and --threads go with --engine ray (without it, trials train one at a "
                         "time in this process)")
    for flag, value in (("--workers", args.workers), ("--threads", args.threads)):
        if value is not None and value < 1:
            raise UsageError(f"search: {flag} must be at least 1, got {value}")
    threads = args.threads or 1
    workers = 1 if args.engine == "local" else args.workers or max(1, (os.cpu_count() or 1) // threads)
    if not 0 < args.promote <= 1:
        raise UsageError(f"search: --promote is the share of a rung that goes on, above 0 and at most 1 (got {args.promote})")
    options = Options(trials=args.trials, hours=args.hours, latency_texts=args.latency_texts,
                      latency_rounds=args.latency_rounds, engine=args.engine, workers=workers, threads=threads,
                      promote=args.promote, **({"rungs": rungs} if rungs else {}))
    layers = _floats(args.layers, "--layers")
    space = {"layers": [int(n) for n in layers] if layers else None, "heads_keep": _floats(args.heads, "--heads"),
             "ffn_keep": _floats(args.ffn, "--ffn"),
             "vocabulary": None if args.vocabulary is None else (args.vocabulary == "yes",),
             "int8": [_settings(text, "--int8") for text in args.int8]}
    reference = Artifact.load(args.reference) if args.reference else None
    folder = Path(args.search_dir) if args.search_dir else Path("runs") / f"{recipe.name}-search"
    summary = Searcher(recipe, folder, goal, options, space, reference).run()
    print((folder / "front.md").read_text(), flush=True)
    return 0 if summary["met"] else 3


def _cmd_report(args) -> int:
    from edgetl.report import write_report

    print(f"wrote {write_report(Path(args.run_dir), args.out)}")
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
    from edgetl.runtime import load

    if bool(args.texts) == bool(args.input):
        raise UsageError("predict: give texts on the command line or --input FILE.jsonl, not both or neither")
    if args.output and not args.input:
        raise UsageError("predict: --output goes with --input")
    if args.engine == "ray":
        return _predict_on_ray(args)
    if args.workers is not None:
        raise UsageError("predict: --workers goes with --engine ray")
    runtime = load(args.bundle, backend=args.backend, threads=args.threads, public_key=args.public_key)
    if args.input:
        from edgetl.scoring import predict_file

        return predict_file(runtime, Path(args.input), Path(args.output) if args.output else None)
    items = _command_line_inputs(args.texts, runtime.text_pair)
    for item, result in zip(items, runtime.predict(items), strict=True):
        shown = item if isinstance(item, str) else "\t".join(item)  # a pair: text, then text_pair
        print(f"{runtime.to_text(result)}\t{shown}")
    return 0


def _predict_on_ray(args) -> int:
    from edgetl.scoring import score_on_ray

    if not args.output:
        raise UsageError("predict --engine ray: --output FOLDER is needed (one Parquet file per input shard)")
    if args.workers is not None and args.workers < 1:
        raise UsageError(f"predict: --workers must be at least 1, got {args.workers}")
    scored, skipped, rows = score_on_ray(args.bundle, args.input, args.output, args.workers, args.threads or 1,
                                         args.backend, args.public_key)
    if not scored:
        print(f"nothing to score: all {skipped} shards are in {args.output} already", file=sys.stderr)
    else:
        print(f"wrote {rows} predictions in {scored} Parquet shards to {args.output}"
              + (f" ({skipped} shards already done, skipped)" if skipped else ""), file=sys.stderr)
    return 0


def _command_line_inputs(texts: list[str], text_pair: bool) -> list:
    """The positional texts, read two at a time as (text, text_pair) for a bundle whose model reads pairs."""
    if not text_pair:
        return list(texts)
    if len(texts) % 2:
        raise UsageError(f"predict: this bundle's model reads (text, text_pair) pairs, so texts go two at a time; "
                         f"{len(texts)} is an odd count")
    return list(zip(texts[::2], texts[1::2], strict=True))


def _cmd_serve(args) -> int:
    if args.web:
        from edgetl.web import serve_page

        serve_page(args.bundle, args.host, args.port)
        return 0
    limits = {k: v for k, v in (("max_body_bytes", args.max_body_bytes), ("max_texts", args.max_texts)) if v is not None}
    if args.engine == "ray":
        from edgetl.replicas import serve_on_ray

        serve_on_ray(args.bundle, args.host, args.port, args.replicas or 2, args.backend, args.threads, args.public_key,
                     max_batch=args.max_batch, **limits)
        return 0
    if args.replicas is not None:
        raise UsageError("--replicas needs --engine ray (edgetl serve alone is one process)")
    from edgetl.runtime import load
    from edgetl.runtime.server import serve

    runtime = load(args.bundle, backend=args.backend, threads=args.threads, public_key=args.public_key)
    serve(runtime, args.host, args.port, max_batch=args.max_batch, **limits)
    return 0


def _cmd_export_web(args) -> int:
    from edgetl.web import export_web, summary

    weights = export_web(args.bundle, args.out, webgpu=args.webgpu)
    print(f"wrote {args.out}: {summary(weights)}. Open it from any static server, e.g. edgetl serve {args.out} --web")
    return 0


def _cmd_keygen(args) -> int:
    from edgetl.runtime.signing import generate_key_pair

    private, public = generate_key_pair(args.out)
    print(f"wrote {private} (private: keep it where bundles are signed, never in an app) and {public} (public: "
          f"ship it with the app, pass it as --public-key or load(..., public_key=...))")
    return 0


def _cmd_shard(args) -> int:
    from edgetl.sharding import shard_bundle

    shard_bundle(args.bundle, args.out, args.parts, args.format, args.max_part_mb, log=log.info)
    print(f"wrote {args.out}: load it as any bundle; its parts run in worker processes pinned to their own cores")
    return 0


def _cmd_sign(args) -> int:
    from edgetl.runtime.bundle import sign_bundle

    print(f"wrote {sign_bundle(args.bundle, args.key)}")
    return 0


def _cmd_generate(args) -> int:
    from edgetl.runtime import GenerationSettings, Generator, load

    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                  top_p=args.top_p, seed=args.seed, stop=tuple(args.stop))  # bad values fail first
    runtime = load(args.bundle, backend=args.backend, threads=args.threads, public_key=args.public_key)
    if not isinstance(runtime, Generator):
        raise UsageError(f"generate: {args.bundle} is a {runtime.task} bundle (served by {type(runtime).__name__}), "
                         "not a text-generation one: use edgetl predict")
    for piece in runtime.stream(args.prompt, settings):
        print(piece, end="", flush=True)
    print()
    return 0


def _cmd_embed(args) -> int:
    import io

    import numpy as np

    from edgetl.artifact import write_bytes_atomic
    from edgetl.runtime import Embedder, load
    from edgetl.scoring import read_texts

    source, target = Path(args.input), Path(args.output)
    if target.suffix != ".npy":
        raise UsageError(f"--output: {target}: the vectors are written as a NumPy .npy file; give a name ending .npy")
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f"--batch-size: {args.batch_size} is not a positive integer")
    texts = read_texts(source, args.field)  # a bad line fails before a model is loaded
    runtime = load(args.bundle, backend=args.backend, threads=args.threads, public_key=args.public_key)
    if not isinstance(runtime, Embedder):
        raise UsageError(f"embed: {args.bundle} is a {runtime.task} bundle (served by {type(runtime).__name__}), not a "
                         f"sentence-embedding one: use edgetl predict for its {runtime.task} results")
    vectors = _embed_texts(runtime, texts, args.batch_size)
    buffer = io.BytesIO()
    np.save(buffer, vectors, allow_pickle=False)
    write_bytes_atomic(target, buffer.getvalue())  # a reader never sees half a file, an error leaves none
    print(f"wrote {vectors.shape[0]} vectors of {vectors.shape[1]} float32 values to {target}", file=sys.stderr)
    return 0


def _embed_texts(runtime, texts: list[str], batch_size: int | None, chunk: int = 1024):
    """``runtime.embed`` of ``texts`` a chunk at a time, with a progress bar (length-grouped batches inside each)."""
    import numpy as np
    from tqdm import tqdm

    parts = [np.zeros((0, runtime.dimension), dtype=np.float32)]
    with tqdm(total=len(texts), desc="embed", unit="text") as progress:
        for start in range(0, len(texts), chunk):
            parts.append(runtime.embed(texts[start:start + chunk], batch_size))
            progress.update(len(parts[-1]))
    return np.concatenate(parts)


PUBLIC_KEY_HELP = ("Ed25519 public key (PEM): refuse the bundle unless edgetl sign signed it with the matching "
                   "private key")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgetl", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--memory-mb", type=int, help="cap this process, and each process it starts (a sharded "
                        "bundle's part workers), at this much data memory (Linux RLIMIT_DATA): a model that needs "
                        "more fails to load, naming the cap")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a recipe (resumes after the last finished stage)")
    run.add_argument("recipe", help="shipped recipe name (sst-int8) or a YAML path")
    run.add_argument("overrides", nargs="*", help="key.path=value, e.g. stages.finetune.epochs=1")
    run.add_argument("--from", dest="from_stage", help="rerun from this stage on, even if finished")
    run.add_argument("--run-dir", help="artifact folder (default: runs/<recipe name>)")
    run.set_defaults(func=_cmd_run)

    search = sub.add_parser("search", help="the most accurate shape of a recipe's chain (layers, heads, FFN, vocabulary, "
                            "INT8 per backend) within a latency/size budget on this machine, or the fastest at or above "
                            "an accuracy floor; writes the front, chosen.yaml and its bundle (resumes when rerun)")
    search.add_argument("recipe", help="a recipe with finetune, distill, prune, export, evaluate stages (sst-tiny)")
    search.add_argument("overrides", nargs="*", help="key.path=value, as for run")
    search.add_argument("--budget-ms", type=float, help="batch-1 p50 budget in ms, over the evaluation texts")
    search.add_argument("--budget-ratio", type=float, help="budget as a fraction of the reference model's p50, timed in "
                        "the same rounds (robust to the machine's speed drifting)")
    search.add_argument("--reference", help="artifact or bundle folder the ratio refers to (default: the recipe's "
                        "first bench.compare entry)")
    search.add_argument("--max-size-mb", type=float, help="model file size budget")
    search.add_argument("--min-accuracy", type=float, help="floor on the task metric, in points (89.9)")
    search.add_argument("--max-drop", type=float, help="floor as points below the teacher")
    search.add_argument("--max-int8-drop", type=float, help="INT8 ships on a backend only within this many points of "
                        "its FP32 model (and only where faster); default: the floor alone when one is given, else 0.5")
    search.add_argument("--hours", type=float, help="start no trial after this many hours; the best so far is reported")
    search.add_argument("--trials", type=int, default=12, help="shapes trained at the first rung (default 12)")
    search.add_argument("--rungs", help="fractions of distill and prune epochs per rung, ending at 1 (default 0.125,0.5,1)")
    search.add_argument("--promote", type=float, default=1 / 3, help="share of a rung's shapes that go on to the next "
                        "(default 1/3; 1 trains every first-rung shape in full)")
    search.add_argument("--layers", help="teacher layers kept, e.g. 2,3,4 (default: 1 to all)")
    search.add_argument("--heads", help="head keep ratios (default 0.25,0.5,0.75,1)")
    search.add_argument("--ffn", help="FFN keep ratios (default 0.25,0.5,0.75,1)")
    search.add_argument("--vocabulary", choices=["yes", "no"], help="cut the vocabulary or not (default: as the recipe)")
    search.add_argument("--int8", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                        help="INT8 settings to try beside the recipe's own quantize stage (repeatable), e.g. "
                             "onnx_method=static or onnx_method=static,smooth_alpha=0.5")
    search.add_argument("--latency-texts", type=int, default=300, help="evaluation texts timed per shape")
    search.add_argument("--latency-rounds", type=int, default=3, help="timing rounds per shape, each a fresh process")
    search.add_argument("--search-dir", help="folder of the search (default: runs/<recipe>-search)")
    search.add_argument("--engine", choices=["local", "ray"], default="local",
                        help="ray: a rung's trials train at once as Ray tasks (the cluster at RAY_ADDRESS, else a "
                             "local one; the search folder on a file system every node sees); benchmarks still run "
                             "one at a time here")
    search.add_argument("--workers", type=int, help="--engine ray: trials trained at once (default: cores / --threads)")
    search.add_argument("--threads", type=int, help="--engine ray: CPUs (torch threads) per trial (default 1)")
    search.set_defaults(func=_cmd_search)

    report = sub.add_parser("report", help="one self-contained HTML page on a finished run: stages, wall times, "
                                           "benchmark table and plot, machine")
    report.add_argument("run_dir", metavar="RUN_DIR", help="a run folder written by `edgetl run`")
    report.add_argument("--out", metavar="PAGE.html", help="where to write the page (default: RUN_DIR/report.html)")
    report.set_defaults(func=_cmd_report)

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

    predict = sub.add_parser("predict", help="predict with a bundle, torch-free: a label, entities, a score or a "
                                             "vector per text (as the bundle's task says)")
    predict.add_argument("bundle")
    predict.add_argument("texts", nargs="*", help="texts; two at a time (text, text_pair) for a bundle of pairs")
    predict.add_argument("--input", help="JSONL file, one input per line: a JSON string or {\"text\": ...}; "
                                         "{\"text\": ..., \"text_pair\": ...} for a bundle of pairs; "
                                         "{\"words\": [...]} for token classification (--engine ray: a folder "
                                         "or glob of such .jsonl files, or .parquet files with those columns)")
    predict.add_argument("--output", help="JSONL file for the inputs and their predictions (default: stdout); "
                                          "--engine ray: a folder")
    predict.add_argument("--backend", default="auto", choices=["auto", "onnxruntime", "openvino"])
    predict.add_argument("--threads", type=int)
    predict.add_argument("--public-key", help=PUBLIC_KEY_HELP)
    predict.add_argument("--engine", choices=["local", "ray"], default="local",
                         help="local: this process, one JSONL file; ray: a folder or glob of .jsonl / .parquet shards "
                              "scored on Ray Data (one bundle per worker actor, one Parquet file per shard in "
                              "--output; a restarted job skips finished shards)")
    predict.add_argument("--workers", type=int, help="--engine ray: worker actors (default: cores / --threads)")
    predict.set_defaults(func=_cmd_predict)

    embed = sub.add_parser("embed", help="embed texts with a sentence-embedding bundle, torch-free: one float32 "
                                         "vector per text, written as a .npy array (n, dimension)")
    embed.add_argument("bundle")
    embed.add_argument("--input", required=True, help="a .jsonl file (one JSON string or {\"text\": ...} per line; "
                                                      "blank lines skipped) or a .txt file (one text per line, "
                                                      "every line a text)")
    embed.add_argument("--output", required=True, help=".npy file for the vectors, row i for the i-th text "
                                                       "(written atomically)")
    embed.add_argument("--field", default="text", help="the JSONL field that holds the text (default: text)")
    embed.add_argument("--backend", default="auto", choices=["auto", "onnxruntime", "openvino"])
    embed.add_argument("--threads", type=int)
    embed.add_argument("--batch-size", type=int,
                       help="texts per model call (default: the bundle's: 64, or 1 for a dynamic-INT8 model whose "
                            "vectors depend on their batch-mates)")
    embed.add_argument("--public-key", help=PUBLIC_KEY_HELP)
    embed.set_defaults(func=_cmd_embed)

    generate = sub.add_parser("generate", help="continue a prompt with a text-generation bundle, torch-free, "
                                               "printing the text as it comes")
    generate.add_argument("bundle")
    generate.add_argument("prompt")
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.0, help="0 (the default): greedy; else sampling")
    generate.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0: all)")
    generate.add_argument("--top-p", type=float, default=1.0, help="sample among the likeliest tokens whose "
                                                                   "probabilities add up to p")
    generate.add_argument("--seed", type=int, help="the sampler's seed (same seed, same text)")
    generate.add_argument("--stop", action="append", default=[], help="a string that ends the text (repeatable)")
    generate.add_argument("--backend", default="auto", choices=["auto", "onnxruntime", "openvino"])
    generate.add_argument("--threads", type=int)
    generate.add_argument("--public-key", help=PUBLIC_KEY_HELP)
    generate.set_defaults(func=_cmd_generate)

    serve = sub.add_parser("serve", help="serve a bundle over HTTP: POST /predict (POST /embed for a "
                                         "sentence-embedding bundle), GET /health, GET /metadata")
    serve.add_argument("bundle", help="a bundle folder, or with --web a folder written by export-web")
    serve.add_argument("--web", action="store_true", help="serve an export-web folder as static files (with the "
                                                          "headers that let its WebAssembly use threads)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    serve.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed at start)")
    serve.add_argument("--backend", default="auto", choices=["auto", "onnxruntime", "openvino"])
    serve.add_argument("--threads", type=int)
    serve.add_argument("--max-batch", type=int, default=64, help="inputs per batch across concurrent requests")
    serve.add_argument("--max-body-bytes", type=int, help="larger requests get 413 (default: 1 MiB)")
    serve.add_argument("--max-texts", type=int, help="texts or sentences per request; more get 413 (default: 1024)")
    serve.add_argument("--public-key", help=PUBLIC_KEY_HELP)
    serve.add_argument("--engine", choices=["uvicorn", "ray"], default="uvicorn",
                       help="uvicorn: one process; ray: replicas on Ray Serve (local cluster, or RAY_ADDRESS)")
    serve.add_argument("--replicas", type=int, help="with --engine ray: replicas, each with --threads threads (default 2)")
    serve.set_defaults(func=_cmd_serve)

    web = sub.add_parser("export-web", help="a text-classification or sentence-embedding bundle as a static web page "
                                            "that runs it in the browser (onnxruntime-web, WebAssembly), offline")
    web.add_argument("bundle")
    web.add_argument("out", help="folder for the page (must not exist)")
    web.add_argument("--webgpu", action="store_true", help="also ship onnxruntime-web's WebGPU build: the page runs the "
                     "model on the GPU where the browser offers WebGPU, in WebAssembly elsewhere")
    web.set_defaults(func=_cmd_export_web)

    keygen = sub.add_parser("keygen", help="make an Ed25519 key pair for signing bundles: OUT (private) and OUT.pub")
    keygen.add_argument("out", help="private key file to write (PEM); the public key goes to OUT.pub")
    keygen.set_defaults(func=_cmd_keygen)

    shard = sub.add_parser("shard", help="split a bundle's models at layer boundaries into parts that run as a "
                                         "pipeline of worker processes, balanced by each layer's measured latency")
    shard.add_argument("bundle")
    shard.add_argument("out", help="folder for the sharded bundle (must not exist)")
    shard.add_argument("--parts", type=int, required=True, help="parts per model (2 to its number of layers)")
    shard.add_argument("--format", action="append", choices=["onnx", "openvino"],
                       help="shard only this model format (repeatable; default: every model in the bundle)")
    shard.add_argument("--max-part-mb", type=float, help="the most a part's model file may weigh (MB): a cap on "
                                                         "each worker's memory for weights")
    shard.set_defaults(func=_cmd_shard)

    sign = sub.add_parser("sign", help="sign a bundle's edgetl.json (which lists every file's sha256): writes "
                                       "edgetl.json.sig beside it")
    sign.add_argument("bundle")
    sign.add_argument("--key", required=True, help="Ed25519 private key (PEM), e.g. from edgetl keygen")
    sign.set_defaults(func=_cmd_sign)
    return parser


def _cap_memory(mb: int) -> None:
    """RLIMIT_DATA for this process; the processes it starts inherit it (each its own allowance)."""
    try:
        import resource
    except ImportError:
        raise UsageError("--memory-mb: this system has no RLIMIT_DATA (POSIX only)") from None
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    if mb < 1 or (hard != resource.RLIM_INFINITY and mb << 20 > hard):
        raise UsageError(f"--memory-mb {mb}: from 1 to this process's hard limit"
                         + ("" if hard == resource.RLIM_INFINITY else f" ({hard >> 20} MB)"))
    resource.setrlimit(resource.RLIMIT_DATA, (mb << 20, hard))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # edgetl's own progress at INFO; the libraries underneath (ONNX Runtime's quantizer logs every tensor
    # at INFO) only from WARNING up.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    log.setLevel(logging.INFO)
    # torchao (pulled in by transformers) registers enums in a way torch now warns about on every import.
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    try:
        if args.memory_mb is not None:
            _cap_memory(args.memory_mb)
        return args.func(args)
    except EdgetlError as exc:
        if args.debug:
            raise
        print(f"edgetl: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
