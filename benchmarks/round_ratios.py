"""Per-round ratios of one `edgetl bench` result: for each batch-1 row and each named model, how many times faster
the row ran (the named model's p50 over the row's in each round: their median, their range, and the plain p50 ratio)
and the row's p50 as a multiple of the named model's (the median of the inverse per-round ratios, as the search's
"x reference" reads a trained model; the plain median, also for an even number of rounds).

    .venv/bin/python benchmarks/round_ratios.py RESULTS.json "onnx-int8 (Optimum default)" "onnx-int8 (sst-int8/06-bundle)"
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from edgetl.bench.measure import round_ratios


def table(rows: list[dict], against: list[str]) -> str:
    by_target = {r["target"]: r for r in rows if r.get("batch") == 1}
    missing = [name for name in against if name not in by_target]
    if missing:
        raise SystemExit(f"not in the results: {', '.join(missing)} (targets: {', '.join(by_target)})")
    lines = ["| model | accuracy % | p50 ms | " + " | ".join(f"faster than {name}: per-round median (range) / p50s | "
                                                          f"x {name}" for name in against) + " |",
             "|---|---:|---:|" + "---:|---:|" * len(against)]
    for target, row in by_target.items():
        cells = []
        for name in against:
            other = by_target[name]
            faster = round_ratios(other, row)
            cells += [f"{statistics.median(faster):.2f}x ({min(faster):.2f}-{max(faster):.2f}) / "
                      f"{other['p50_ms'] / row['p50_ms']:.2f}x", f"{statistics.median(round_ratios(row, other)):.3f}x"]
        accuracy = "–" if row.get("accuracy") is None else f"{row['accuracy'] * 100:.2f}"
        lines.append(f"| {target} | {accuracy} | {row['p50_ms']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="results.json of `edgetl bench`")
    parser.add_argument("against", nargs="+", help="targets to compare every row with, as named in results.json")
    args = parser.parse_args()
    print(table(json.loads(args.results.read_text())["rows"], args.against))


if __name__ == "__main__":
    main()
