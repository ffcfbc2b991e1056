"""edgetl command line: run / validate recipes, benchmark artifacts, predict with a bundle."""

from __future__ import annotations

import argparse
import logging
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


def _cmd_bench(args) -> int:
    from edgetl.artifact import MODEL_KINDS, Artifact
    from edgetl.bench.run import benchmark
    from edgetl.data import load_labelled
    from edgetl.recipe import BenchConfig, DataConfig, Recipe

    path = Path(args.target)
    if (path / "manifest.json").is_file():
        artifacts, run_dir = [Artifact.load(path)], path.parent
    elif path.is_dir():
        artifacts = [Artifact.load(p) for p in sorted(path.iterdir()) if (p / "manifest.json").is_file()]
        run_dir = path
    else:
        raise UsageError(f"{path}: neither an artifact folder nor a run folder")
    resolved = run_dir / "recipe.resolved.yaml"
    if resolved.is_file():
        import yaml

        recipe = Recipe.model_validate(yaml.safe_load(resolved.read_text()))
        data, bench = recipe.data, recipe.bench
    else:
        data, bench = DataConfig(), BenchConfig()
    bench = bench.model_copy(update={k: v for k, v in (("rounds", args.rounds), ("threads", args.threads),
                                                       ("max_sentences", args.max_sentences)) if v is not None})
    evaluations = [a for a in (Artifact.load(p) for p in run_dir.iterdir() if (p / "manifest.json").is_file())
                   if a.kind == "evaluation"] if run_dir.is_dir() else []
    accuracy = evaluations[-1].metrics if evaluations else {}
    models = [a for a in artifacts if a.kind in MODEL_KINDS]
    if not models:
        raise UsageError(f"{path}: no model artifacts to benchmark")
    _, dev = load_labelled(data)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    benchmark(models, dev["text"], accuracy, bench, data.max_length, out, title=str(path))
    print(f"wrote {out}/report.md, results.json, results.csv, accuracy_vs_latency.png")
    return 0


def _cmd_predict(args) -> int:
    from edgetl.runtime import TextClassifier

    if not args.texts:
        raise UsageError("predict: give at least one text")
    classifier = TextClassifier.load(args.bundle, backend=args.backend, threads=args.threads)
    for text, pred in zip(args.texts, classifier.predict(args.texts), strict=True):
        print(f"{pred.label}\t{pred.score:.4f}\t{text}")
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

    bench = sub.add_parser("bench", help="benchmark an artifact or every model artifact of a run folder")
    bench.add_argument("target", help="artifact folder or run folder")
    bench.add_argument("--out", default="bench-results", help="output folder (default: bench-results)")
    bench.add_argument("--rounds", type=int)
    bench.add_argument("--threads", type=int)
    bench.add_argument("--max-sentences", type=int)
    bench.set_defaults(func=_cmd_bench)

    predict = sub.add_parser("predict", help="classify texts with a bundle (torch-free)")
    predict.add_argument("bundle")
    predict.add_argument("texts", nargs="*")
    predict.add_argument("--backend", default="auto", choices=["auto", "onnxruntime", "openvino"])
    predict.add_argument("--threads", type=int)
    predict.set_defaults(func=_cmd_predict)
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
