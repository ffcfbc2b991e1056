"""Do two runs of the same `edgetl bench` agree? Per cell, the ratio of p50s, judged against the noise flags.

    .venv/bin/python benchmarks/repeatability.py A/results.json B/results.json [--out table.md]

A cell agrees when its p50 ratio B/A lies within [0.9, 1.1]; a cell outside that range is acceptable only if
either run flagged it noisy. Exit status 1 if any unflagged cell disagrees.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

LOW, HIGH = 0.9, 1.1


def cell(row: dict) -> tuple:
    return row["target"], row["threads"], row["batch"], row["seq"]


def compare(first: dict, second: dict) -> list[dict]:
    other = {cell(r): r for r in second["rows"]}
    rows = []
    for a in first["rows"]:
        b = other.get(cell(a))
        if b is None:
            continue
        ratio = b["p50_ms"] / a["p50_ms"]
        verdict = "agrees" if LOW <= ratio <= HIGH else "flagged noisy" if a["noisy"] or b["noisy"] else "DISAGREES"
        rows.append({"target": a["target"], "threads": a["threads"], "batch": a["batch"], "seq": a["seq"],
                     "p50_a": a["p50_ms"], "p50_b": b["p50_ms"], "ratio": round(ratio, 3),
                     "spread_a": a["round_spread"], "spread_b": b["round_spread"], "verdict": verdict})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("first", type=Path)
    parser.add_argument("second", type=Path)
    parser.add_argument("--out", type=Path, help="write the Markdown table here too")
    args = parser.parse_args()
    rows = compare(json.loads(args.first.read_text()), json.loads(args.second.read_text()))
    counts = {v: sum(r["verdict"] == v for r in rows) for v in ("agrees", "flagged noisy", "DISAGREES")}
    lines = [f"Repeatability: {args.first} vs {args.second}: {len(rows)} cells; "
             + ", ".join(f"{n} {v}" for v, n in counts.items()) + f" (p50 ratio within [{LOW}, {HIGH}]).", "",
             "| target | threads | batch | seq | p50 A ms | p50 B ms | B/A | round spread A | round spread B | verdict |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---|"]
    lines += [f"| {r['target']} | {r['threads'] or 'default'} | {r['batch']} | {r['seq']} | {r['p50_a']:.2f} | "
              f"{r['p50_b']:.2f} | {r['ratio']:.3f} | {r['spread_a']:.1%} | {r['spread_b']:.1%} | {r['verdict']} |"
              for r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 1 if counts["DISAGREES"] else 0


if __name__ == "__main__":
    sys.exit(main())
