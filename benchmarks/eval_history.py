"""How a training stage's dev accuracy moved: best evaluation, its step, and the mean of the last evaluations,
for the kept weights and, with a weight average (``ema_decay``), for the training weights beside it.

    python benchmarks/eval_history.py runs/sst-int8/01-finetune [more stage folders...] [--last 7]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def summary(history: list[dict], key: str, last: int) -> str:
    scores = [(h["step"], h[key]) for h in history if key in h]
    step, best = max(scores, key=lambda s: s[1])  # the first of equals, as Trainer keeps it
    tail = [score for _, score in scores[-last:]]
    return f"{100 * best:.2f} % (step {step}) | {100 * sum(tail) / len(tail):.2f} %"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="stage folders holding eval_history.json")
    parser.add_argument("--last", type=int, default=7, help="evaluations averaged at the end of training")
    args = parser.parse_args()
    print(f"| stage | weights | evaluations | best dev (bf16 autocast) | mean of the last {args.last} |")
    print("|---|---|---:|---:|---:|")
    for folder in args.folders:
        history = json.loads((folder / "eval_history.json").read_text())
        averaged = any("eval_raw_accuracy" in h for h in history)
        rows = [("average", "eval_accuracy"), ("training", "eval_raw_accuracy")] if averaged else [("training", "eval_accuracy")]
        for weights, key in rows:
            print(f"| {folder} | {weights} | {len(history)} | {summary(history, key, args.last)} |")


if __name__ == "__main__":
    main()
