"""A finished `edgetl search` folder into benchmarks/results/, with the latency predictions checked against trained
models (nothing is measured here: every figure comes from the search's and the runs' own files).

    python benchmarks/search_results.py runs/sst-tiny-search [--trained runs/sst-tiny ...] --out benchmarks/results/sst-tiny-search/COMMIT

- every fully trained option of the search: the p50 predicted from its untrained shape against the p50 its trial's
  benchmark measured, each as a multiple of the reference model timed in the same rounds (the machine's speed
  drifts between the two measurements; the ratio does not); a benchmark whose per-round p50s of the model or the
  reference spread by more than 10 % is marked noisy (the machine was busy);
- ``latency.md``: the untrained shapes' table as the search measured it (each target's p50 as a multiple of the
  reference's);
- ``--trained``: finished runs of the same recipe outside the search (e.g. the hand-built `sst-tiny`) whose shape is
  in the search's latency table, checked the same way.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import yaml

from edgetl.bench.measure import round_ratio

COPIED = ("search.json", "latency.json", "front.md", "front.png", "chosen.yaml")


def shape_of(run: Path) -> str:
    """The search's key of a run's shape (``L3-h0.5-f0.5-vocab``), from its resolved recipe."""
    stages = {s["stage"]: s for s in yaml.safe_load((run / "recipe.resolved.yaml").read_text())["stages"]}
    distill, prune = stages["distill"], stages["prune"]
    return (f"L{len(distill['layers'])}-h{prune['heads_keep']:g}-f{prune['ffn_keep']:g}"
            + ("-vocab" if prune["vocabulary"] else ""))


NOISE = 0.10  # the benchmark's default noise threshold: per-round p50s spread by more than this of their median


def noisy(*rows: dict) -> bool:
    return any((max(r["round_p50_ms"]) - min(r["round_p50_ms"])) / sorted(r["round_p50_ms"])[len(r["round_p50_ms"]) // 2]
               > NOISE for r in rows)


def measured_ratios(run: Path, reference: str) -> dict[str, tuple[float, bool]]:
    """``{"onnx-int8": (x reference, as the search reads it; noisy), ...}`` from the run's benchmark."""
    rows = {r["target"]: r for r in json.loads(next(run.glob("[0-9][0-9]-benchmark/results.json")).read_text())["rows"]}
    ref = next(r for key, r in rows.items() if key.startswith(reference) and "/" in key)
    names = {"exported": next(run.glob("[0-9][0-9]-export")).name, "quantized": next(run.glob("[0-9][0-9]-quantize")).name}
    found = {}
    for backend in ("onnx", "openvino"):
        for precision, kind in (("fp32", "exported"), ("int8", "quantized")):
            row = rows.get(f"{backend}-{precision} ({names[kind]})")
            if row:
                found[f"{backend}-{precision}"] = round_ratio(row, ref), noisy(row, ref)
    return found


def check(search_dir: Path, search: dict, table: dict, trained: list[Path]) -> list[dict]:
    rows = []
    for shape, result in search["rungs"].get("1", {}).items():
        for option in result["options"]:  # each measured in its own run: the INT8 settings after the first in a sibling
            run = search_dir / "trials" / Path(option.get("run_dir") or result["run_dir"]).name
            ratio, flagged = measured_ratios(run, "onnx-int8 (")[option["target"].split(" ")[0]]
            rows.append({"model": f"search trial {shape}", "shape": shape, "target": option["target"],
                         "predicted_ratio": table[shape][option["target"]]["ratio"], "measured_ratio": ratio,
                         "noisy": flagged})
    for run in trained:
        shape = shape_of(run)
        if shape not in table:
            continue
        for target, (ratio, flagged) in measured_ratios(run, "onnx-int8 (").items():
            rows.append({"model": f"{run.name} (trained outside the search)", "shape": shape, "target": target,
                         "predicted_ratio": table[shape][target]["ratio"], "measured_ratio": ratio, "noisy": flagged})
    for row in rows:
        if row["predicted_ratio"] and row["measured_ratio"]:
            row["error"] = round(row["predicted_ratio"] / row["measured_ratio"] - 1, 4)
    return rows


def latency_table(table: dict) -> str:
    targets = sorted({t for entry in table.values() for t in entry})
    lines = ["| shape | " + " | ".join(f"{t} x reference" for t in targets) + " | INT8 MB (ONNX) |",
             "|---|" + "---:|" * (len(targets) + 1)]
    for shape, entry in sorted(table.items(), key=lambda kv: kv[1]["onnx-int8"]["ratio"]):
        lines.append(f"| {shape} | " + " | ".join(f"{entry[t]['ratio']}" + (" (noisy)" if entry[t]["noisy"] else "")
                                                   for t in targets) + f" | {entry['onnx-int8']['model_mb']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("search_dir", type=Path)
    parser.add_argument("--trained", type=Path, nargs="*", default=[])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        if (args.search_dir / name).is_file():
            shutil.copy2(args.search_dir / name, args.out / name)
    search = json.loads((args.search_dir / "search.json").read_text())
    table = json.loads((args.search_dir / "latency.json").read_text())["shapes"]
    rows = check(args.search_dir, search, table, args.trained)
    (args.out / "predictions.json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = ["| model | shape | target | predicted x reference | measured x reference | error | benchmark |",
             "|---|---|---|---:|---:|---:|---|"]
    lines += [f"| {r['model']} | {r['shape']} | {r['target']} | {r['predicted_ratio']} | {r['measured_ratio']} | "
              f"{format(r['error'] * 100, '+.1f') + ' %' if 'error' in r else ''} | {'noisy' if r['noisy'] else ''} |"
              for r in rows]
    (args.out / "predictions.md").write_text("\n".join(lines) + "\n")
    (args.out / "latency.md").write_text(latency_table(table) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
