"""Few-shot learning on k labelled reviews of one Amazon domain: cloze questions (zero-shot, PET, P-tuning, AutoPrompt
search) and a meta-learned initialisation (Reptile over SST-2 and the other domains), beside head fine-tuning, LoRA
and soft prompts, for the encoder (MiniLM-L6) and the decoder (SmolLM2-135M).

    python benchmarks/prompts.py [--target electronics] [--k 16 64] [--seeds 1 2 3] [--arms NAME ...]

Every arm is a shipped recipe with overrides (below), run by ``edgetl run`` in a subprocess, one run folder per
arm, k and seed (finished runs are skipped, so an interrupted experiment resumes; an adapt stage with the same
fingerprint is copied from a sibling run, not retrained). The k labelled reviews are the first k of the domain's
training file after a fixed shuffle (``data.max_train_samples``), the same for every arm and seed; the seed sets
initialisation, dropout and batch order. Test = the domain's 300 dev reviews; every run keeps its last weights,
nothing is chosen on them. Zero-shot does not depend on k or the seed: it runs once. Writes
``<out>/<target>.json`` and ``.md`` (mean and sample standard deviation over seeds, each seed's value) after each run.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from pathlib import Path

import yaml

from domain_adaptation import FEWSHOT_LR, REPO, accuracies, run, summarize

AMAZON_DOMAINS = ("books", "dvd", "electronics", "kitchen")  # edgetl.corpora's; the meta arm learns from the others

PTUNING = ["stages.finetune.cloze.train=prompt", "stages.finetune.learning_rate=0.01",
           "stages.finetune.cloze.pattern='{text} {prompt} All in all, it was {mask}.'"]
AUTOPROMPT = ["stages.finetune.cloze.train=none", "stages.finetune.cloze.verbalizer_search=1",
              "stages.finetune.cloze.trigger_tokens=3",
              "stages.finetune.cloze.pattern='{text} {prompt} All in all, it was {mask}.'"]
# SmolLM2's forward passes cost about 30x MiniLM's: a smaller search (fewer steps, tries and rows).
DECODER_AUTOPROMPT = [o.replace("All in all, it was {mask}.", "All in all, it was {mask}") for o in AUTOPROMPT] + [
    "stages.finetune.cloze.search_steps=6", "stages.finetune.cloze.search_candidates=4",
    "stages.finetune.cloze.search_batch_size=8"]
DECODER_HEAD = ["stages.finetune.method=lora", "stages.finetune.cloze=null", "stages.finetune.pooling=cls",
                "stages.finetune.lora_modules=[q_proj,k_proj,v_proj,o_proj]", "stages.finetune.learning_rate=0.0005"]
# name -> (model, recipe, stages kept (None: all), overrides (or a function of the target giving them), depends on
# k and seed). Order = run order.
ARMS = {
    "head fine-tuning (full)": ("MiniLM-L6", "amazon-electronics-fewshot", ["finetune", "evaluate"], [], True),
    "LoRA": ("MiniLM-L6", "amazon-electronics-fewshot", ["finetune", "evaluate"],
             ["stages.finetune.method=lora", f"stages.finetune.learning_rate={FEWSHOT_LR['lora']}"], True),
    "soft prompt (prompt-tuning)": ("MiniLM-L6", "amazon-electronics-fewshot", ["finetune", "evaluate"],
                                    ["stages.finetune.method=prompt-tuning",
                                     f"stages.finetune.learning_rate={FEWSHOT_LR['prompt-tuning']}"], True),
    "cloze zero-shot (DAPT MLM head)": ("MiniLM-L6", "amazon-electronics-cloze", ["adapt", "finetune", "evaluate"],
                                        ["stages.finetune.cloze.train=none"], False),
    "cloze PET": ("MiniLM-L6", "amazon-electronics-cloze", None, [], True),
    # PET with head fine-tuning's optimisation budget (amazon-electronics-fewshot: 60 steps of 16 rows at 5e-5),
    # added after the recipe's own PET settings (40 steps of 8 at 2e-5) had trained too little to compare.
    "cloze PET (head fine-tuning's budget)": ("MiniLM-L6", "amazon-electronics-cloze", None, [
        "stages.finetune.max_steps=60", "stages.finetune.batch_size=16", "stages.finetune.learning_rate=5e-05"], True),
    "cloze P-tuning": ("MiniLM-L6", "amazon-electronics-cloze", ["adapt", "finetune", "evaluate"], PTUNING, True),
    "cloze AutoPrompt (searched words and triggers, LM frozen)": (
        "MiniLM-L6", "amazon-electronics-cloze", ["adapt", "finetune", "evaluate"], AUTOPROMPT, True),
    "meta (Reptile) + head fine-tuning": ("MiniLM-L6", "amazon-electronics-meta", None, lambda target: [
        f"stages.meta.sources=[{','.join(['sst2', *(d for d in AMAZON_DOMAINS if d != target)])}]"], True),
    # The control: the same source batches by ordinary multi-source fine-tuning, then the same adaptation.
    "multi-source fine-tuning + head fine-tuning (control)": (
        "MiniLM-L6", "amazon-electronics-meta", None, lambda target: [
            f"stages.meta.sources=[{','.join(['sst2', *(d for d in AMAZON_DOMAINS if d != target)])}]",
            "stages.meta.algorithm=joint"], True),
    "decoder cloze zero-shot": ("SmolLM2-135M", "smollm2-electronics-cloze", ["finetune", "evaluate"],
                                ["stages.finetune.cloze.train=none"], False),
    "decoder cloze PET": ("SmolLM2-135M", "smollm2-electronics-cloze", ["finetune", "evaluate"], [], True),
    "decoder head (LoRA, last token)": ("SmolLM2-135M", "smollm2-electronics-cloze", ["finetune", "evaluate"],
                                        DECODER_HEAD, True),
    "decoder cloze P-tuning": ("SmolLM2-135M", "smollm2-electronics-cloze", ["finetune", "evaluate"],
                               [o.replace("All in all, it was {mask}.", "All in all, it was {mask}") for o in PTUNING],
                               True),
    "decoder cloze AutoPrompt (searched, LM frozen)": (
        "SmolLM2-135M", "smollm2-electronics-cloze", ["finetune", "evaluate"], DECODER_AUTOPROMPT, True),
}


def variant(recipe: str, keep: list[str] | None, runs: Path) -> str | Path:
    """The shipped recipe, or a copy of it with only the stages ``keep`` (written beside the runs)."""
    if keep is None:
        return recipe
    raw = yaml.safe_load((REPO / "recipes" / f"{recipe}.yaml").read_text())
    raw["stages"] = [s for s in raw["stages"] if s["stage"] in keep]
    path = runs / f"{recipe}-{'-'.join(keep)}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def experiment(target: str, ks: list[int], seeds: list[int], arms: list[str], runs: Path, save) -> list[dict]:
    rows = []
    for k in ks:
        for name in arms:
            model, recipe, keep, overrides, seeded = ARMS[name]
            for seed in seeds if seeded else seeds[:1]:
                if not seeded and k != ks[0]:
                    continue
                slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")  # the whole name: arms differ in their brackets
                tag = f"{recipe}-{slug}-k{k}-s{seed}" if seeded else f"{recipe}-zero-shot"
                common = [f"data.target={target}", f"data.max_train_samples={k}", f"stages.finetune.seed={seed}"]
                extra = overrides(target) if callable(overrides) else overrides
                folder = run(variant(recipe, keep, runs), runs / tag, [*common, *extra])
                for key, value in accuracies(folder).items():
                    rows.append({"part": f"k={k}" if seeded else "zero-shot", "method": name, "model": f"{model} {key}",
                                 "seed": seed, "accuracy": value})
                save(rows)
    return rows


def markdown(target: str, table: list[dict], machine: str, command: str, complete: bool) -> str:
    lines = [f"# Few-shot prompt learning on Amazon {target} (accuracy on its 300 dev reviews, %)", "",
             f"Machine: {machine}. Command: `{command}`.", "",
             "| k | method | model | mean | std (seeds) | per seed |", "|---|---|---|---:|---:|---|"]
    for t in sorted(table, key=lambda t: (t["part"] != "zero-shot", t["part"])):
        std = "" if t["std"] is None else f"{t['std']:.2f}"
        lines.append(f"| {t['part']} | {t['method']} | {t['model']} | {t['mean']:.2f} | {std} | "
                     f"{', '.join(f'{v:.2f}' for v in t['values'])} (seeds {t['seeds']}) |")
    if not complete:
        lines += ["", "Incomplete: the experiment is still running or was interrupted (rerun the command to finish)."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="electronics", help="data.target of every recipe (default electronics)")
    parser.add_argument("--k", type=int, nargs="+", default=[16, 64], help="labelled reviews per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--runs", default="runs/prompts", help="parent of the run folders")
    parser.add_argument("--out", default="benchmarks/results/prompts")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from edgetl.bench.machine import describe, machine_info

    runs, out = Path(args.runs) / args.target, Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = describe(machine_info())
    command = "python benchmarks/prompts.py " + shlex.join(sys.argv[1:])

    def save(rows, final=False):
        table = summarize(rows)
        (out / f"{args.target}.json").write_text(json.dumps(
            {"target": args.target, "k": args.k, "seeds": args.seeds, "arms": args.arms, "machine": machine,
             "command": command, "complete": final, "rows": rows, "table": table}, indent=1))
        (out / f"{args.target}.md").write_text(markdown(args.target, table, machine, command, final))

    save(experiment(args.target, args.k, args.seeds, args.arms, runs, save), final=True)
    print((out / f"{args.target}.md").read_text(), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
