"""Short distillation trials behind ``stsb-embed-tiny``'s student settings (issue 17): which teacher layers the
3-layer copy keeps, the learning rate, and whether matching hidden states helps, each judged by the MSE to the
teacher's vectors on the 1,000 held-out training sentences that select the checkpoint (dev Spearman is printed
beside it, not used to choose).

Each trial runs the recipe's ``pretrained`` and ``distill`` stages alone, for ``--steps`` optimizer steps (the
learning-rate schedule compressed to them), one after another in a run folder of its own under ``--work``.

    python benchmarks/embedding_distill_trials.py --steps 600 --out benchmarks/results/stsb-embed-tiny/COMMIT-trials
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml

# name -> overrides of the recipe's distill stage
TRIALS = {
    "layers 0,2,4 (every other), lr 1e-4": {"depth": None, "layers": [0, 2, 4], "learning_rate": 1e-4},
    "layers 0,2,4, lr 1e-4, hidden states 0.01": {"depth": None, "layers": [0, 2, 4], "learning_rate": 1e-4,
                                                  "hidden_weight": 0.01},
    "layers 0,2,4, lr 1e-4, hidden states 0.1": {"depth": None, "layers": [0, 2, 4], "learning_rate": 1e-4,
                                                 "hidden_weight": 0.1},
    "layers 0,2,4, lr 3e-4": {"depth": None, "layers": [0, 2, 4], "learning_rate": 3e-4},
    "depth 3, lr 1e-4": {"learning_rate": 1e-4},
    "depth 3, lr 3e-4 (the recipe)": {},
}


def trial_recipe(recipe: Path, overrides: dict, steps: int) -> dict:
    raw = yaml.safe_load(recipe.read_text())
    raw["stages"] = [s for s in raw["stages"] if s["stage"] in ("pretrained", "distill")]
    distill = next(s for s in raw["stages"] if s["stage"] == "distill")
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
    parser.add_argument("--recipe", default="recipes/stsb-embed-tiny.yaml")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--work", default="runs/embedding-distill-trials")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, (name, overrides) in enumerate(TRIALS.items()):
        folder = work / f"trial-{index}"
        recipe_file = work / f"trial-{index}.yaml"
        recipe_file.write_text(yaml.safe_dump(trial_recipe(Path(args.recipe), overrides, args.steps), sort_keys=False))
        print(f"[{index + 1}/{len(TRIALS)}] {name}", flush=True)
        subprocess.run([sys.executable, "-m", "edgetl", "run", str(recipe_file), "--run-dir", str(folder)], check=True)
        metrics = json.loads((folder / "02-distill" / "manifest.json").read_text())["metrics"]
        history = json.loads((folder / "02-distill" / "eval_history.json").read_text())
        by_step = {h["step"]: h["eval_loss"] for h in history if "eval_loss" in h}
        rows.append({"trial": name, "overrides": overrides, "steps": args.steps, "held_out_mse_by_step": by_step,
                     "held_out_mse_kept": min(by_step.values()), "dev_spearman": metrics["spearman"],
                     "chosen_layers": metrics.get("chosen_layers"), "layer_scores": metrics.get("layer_scores")})
    (out / "trials.json").write_text(json.dumps(rows, indent=1))
    lines = ["| trial | held-out MSE (kept) | dev Spearman |", "|---|---:|---:|"]
    lines += [f"| {r['trial']} | {r['held_out_mse_kept']:.6f} | {r['dev_spearman']:.2f} |" for r in rows]
    (out / "trials.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
