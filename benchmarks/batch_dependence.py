"""Does a text's prediction depend on what else is in its batch? Per backend of a bundle, on SST-2 dev.

    .venv/bin/python benchmarks/batch_dependence.py runs/sst-int8/06-bundle --out benchmarks/results/sst-int8

Classifies every dev sentence in length-grouped batches of 1, 8, 32 and 64 and compares each with batch 1
(each text alone): labels that changed, the largest probability difference, accuracy, and throughput.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from edgetl.runtime import TextClassifier  # noqa: E402
from edgetl.runtime.text import softmax  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--dev", type=Path, default=Path(os.environ.get("EDGETL_DATA_DIR", REPO.parent / "shared/datasets"))
                        / "sst2" / "dev.tsv")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = [line.split("\t") for line in args.dev.read_text(encoding="utf-8").splitlines()[1:] if line.strip()]
    texts, labels = [r[0] for r in rows], np.array([int(r[1]) for r in rows])
    results = []
    for backend in json.loads((args.bundle / "edgetl.json").read_text())["models"]:
        classifier = TextClassifier.load(args.bundle, backend=backend)
        classifier.logits(texts[:64], batch_size=8)  # warm-up
        alone = None
        for batch_size in (1, 8, 32, 64):
            start = time.perf_counter()
            probabilities = softmax(classifier.logits(texts, batch_size=batch_size))
            seconds = time.perf_counter() - start
            alone = probabilities if alone is None else alone
            row = {"backend": backend, "batch_size": batch_size, "texts": len(texts),
                   "labels_changed_vs_alone": int((probabilities.argmax(-1) != alone.argmax(-1)).sum()),
                   "max_probability_change": round(float(np.abs(probabilities - alone).max()), 5),
                   "accuracy": round(float((probabilities.argmax(-1) == labels).mean()), 5),
                   "texts_per_s": round(len(texts) / seconds, 1)}
            results.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        from edgetl.bench.machine import describe, machine_info

        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "batch_dependence.json").write_text(json.dumps(
            {"bundle": str(args.bundle), "machine": describe(machine_info()), "rows": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
