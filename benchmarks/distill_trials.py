"""Short distillation trials: which teacher layers a 3-layer copy keeps (``distill.layers`` or ``distill.depth``),
the learning rate, and whether matching hidden states helps.

``--trials embedding`` (``stsb-embed-tiny``, issue 17): each judged by the MSE to the teacher's vectors on the
1,000 held-out training sentences that select the checkpoint (dev Spearman beside it, not used to choose).
``--trials classification`` (``sst-tiny``): each judged by dev accuracy, which selects a classifier's checkpoint.

Each trial runs the recipe's stages up to ``distill`` alone (the teacher copied from a finished run in
``--work``, as ``edgetl run`` does: ``sst-int8``'s for ``sst-tiny``), for ``--steps`` optimizer steps (the
learning-rate schedule compressed to them), one after another in a run folder of its own in ``--work``.

    python benchmarks/distill_trials.py --trials embedding --steps 600 --out benchmarks/results/stsb-embed-tiny/COMMIT-trials
    python benchmarks/distill_trials.py --trials classification --steps 800 --out benchmarks/results/sst-tiny/COMMIT-depth
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml

# recipe, then trial name -> overrides of the recipe's distill stage
EMBEDDING = {
    "layers 0,2,4 (every other), lr 1e-4": {"depth": None, "layers": [0, 2, 4], "learning_rate": 1e-4},
    "layers 0,2,4, lr 1e-4, hidden states 0.01": {"depth": None, "layers": [0, 2, 4], "learning_rate": 1e-4,
                                                  "hidden_weight": 0.01},
    "layers 0,2,4, lr 1e-4, hidden states 0.1": {"depth": None, "layers": [0, 2, 4], "learning_rate": 1e-4,
                                                 "hidden_weight": 0.1},
    "layers 0,2,4, lr 3e-4": {"depth": None, "layers": [0, 2, 4], "learning_rate": 3e-4},
    "depth 3, lr 1e-4": {"learning_rate": 1e-4},
    "depth 3, lr 3e-4 (the recipe)": {},
}
CLASSIFICATION = {
    "layers 0,2,4 (the recipe)": {},
    "depth 3": {"layers": None, "depth": 3},
}
TRIALS = {"embedding": ("recipes/stsb-embed-tiny.yaml", EMBEDDING),
          "classification": ("recipes/sst-tiny.yaml", CLASSIFICATION)}


def trial_recipe(recipe: Path, overrides: dict, steps: int) -> dict:
    raw = yaml.safe_load(recipe.read_text())
    raw["stages"] = raw["stages"][:next(i for i, s in enumerate(raw["stages"]) if s["stage"] == "distill") + 1]
    distill = raw["stages"][-1]
    distill.update({"max_steps": steps, "eval_steps": steps // 3})
    for key, value in overrides.items():
        if value is None:
            distill.pop(key, None)
        else:
            distill[key] = value
    raw.pop("bench", None)  # no benchmark: nothing to compare with
    raw["name"] = f"{raw['name']}-trial"
    return raw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", choices=sorted(TRIALS), default="embedding")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--work", default="runs", help="where the trials' run folders go, beside finished runs")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    recipe, trials = TRIALS[args.trials]
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, (name, overrides) in enumerate(trials.items()):
        folder = work / f"distill-trial-{args.trials}-{index}"
        recipe_file = work / f"distill-trial-{args.trials}-{index}.yaml"
        raw = trial_recipe(Path(recipe), overrides, args.steps)
        recipe_file.write_text(yaml.safe_dump(raw, sort_keys=False))
        print(f"[{index + 1}/{len(trials)}] {name}", flush=True)
        subprocess.run([sys.executable, "-m", "edgetl", "run", str(recipe_file), "--run-dir", str(folder)], check=True)
        metrics = json.loads((folder / "02-distill" / "manifest.json").read_text())["metrics"]
        history = json.loads((folder / "02-distill" / "eval_history.json").read_text())
        by_step = {h["step"]: h["eval_loss"] for h in history if "eval_loss" in h}
        rows.append({"trial": name, "overrides": overrides, "steps": args.steps, "eval_loss_by_step": by_step,
                     "held_out_mse_kept": min(by_step.values()) if args.trials == "embedding" else None,
                     "dev_spearman": metrics.get("spearman"), "dev_accuracy": metrics.get("accuracy"),
                     "layers": metrics.get("chosen_layers") or raw["stages"][-1].get("layers"),
                     "chosen_layers": metrics.get("chosen_layers"), "layer_scores": metrics.get("layer_scores")})
    (out / "trials.json").write_text(json.dumps(rows, indent=1))
    if args.trials == "embedding":
        lines = ["| trial | held-out MSE (kept) | dev Spearman |", "|---|---:|---:|"]
        lines += [f"| {r['trial']} | {r['held_out_mse_kept']:.6f} | {r['dev_spearman']:.2f} |" for r in rows]
    else:
        lines = ["| trial | teacher layers kept | dev accuracy (kept) |", "|---|---|---:|"]
        lines += [f"| {r['trial']} | {', '.join(map(str, r['layers']))} | {100 * r['dev_accuracy']:.2f} % |" for r in rows]
    (out / "trials.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
