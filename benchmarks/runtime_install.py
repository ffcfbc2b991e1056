"""What an app pays for the runtime: install size of each runtime extra in a fresh venv, and cold start.

    .venv/bin/python benchmarks/runtime_install.py runs/sst-int8/06-bundle --out benchmarks/results
    .venv/bin/python benchmarks/runtime_install.py runs/stsb-embed-int8/06-bundle --no-install

For each of `edgetl` (ONNX Runtime), `edgetl[openvino]` and `edgetl[serve]`: a fresh virtual environment,
`pip install` of this checkout, the size of what the install added (MB, the venv minus a bare venv), a check
that torch and transformers are absent, and the cold start of BUNDLE in that venv: a new Python process
that imports `edgetl.runtime`, loads the bundle with `edgetl.runtime.load` (checksums verified; the runtime of
the bundle's task: a classifier, a tagger, a regressor or an embedder) and answers one input (a text, or a pair
for a bundle of pairs), timed from before the import to after the answer (median of `--repeats` processes), with
the import, the load and the first answer apart.

`--no-install` skips the venvs and times the cold start with this Python, once per backend of the bundle
(written to cold_start.json under `--out`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

COLD_START = """
import json, sys, time
start = time.perf_counter()
from edgetl.runtime import load
imported = time.perf_counter()
runtime = load(sys.argv[1], backend=sys.argv[2])
loaded = time.perf_counter()
text = "a gorgeous, witty, seductive movie."
result = runtime.predict([(text, "a fine film.") if runtime.text_pair else text])[0]
answered = time.perf_counter()
assert "torch" not in sys.modules and "transformers" not in sys.modules
print(json.dumps({"total_s": answered - start, "import_s": imported - start, "load_s": loaded - imported,
                  "first_answer_s": answered - loaded, "runtime": type(runtime).__name__,
                  "answer": runtime.to_text(result)[:40]}))
"""


def folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink()) / 1e6


def fresh_venv(folder: Path, requirement: str | None) -> Path:
    venv.create(folder, with_pip=True)
    python = folder / "bin" / "python"
    if requirement:
        subprocess.run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", requirement], check=True)
    return python


def absent(python: Path, module: str) -> bool:
    return subprocess.run([python, "-c", f"import {module}"], capture_output=True).returncode != 0


def cold_start(python: Path, bundle: Path, backend: str, repeats: int) -> dict:
    runs = [json.loads(subprocess.run([python, "-c", COLD_START, str(bundle), backend], capture_output=True, text=True,
                                      check=True, cwd=tempfile.gettempdir()).stdout) for _ in range(repeats)]
    times = [run["total_s"] for run in runs]
    parts = {f"median_{key}": round(statistics.median(run[key] for run in runs), 3)
             for key in ("import_s", "load_s", "first_answer_s")}
    return {"median_s": round(statistics.median(times), 3), "max_s": round(max(times), 3), **parts, "runs": repeats,
            "runtime": runs[-1]["runtime"], "answer": runs[-1]["answer"]}


def cold_start_here(bundle: Path, repeats: int, out: Path | None) -> int:
    """The cold start of each of the bundle's backends with this Python (no fresh venvs)."""
    models = json.loads((bundle / "edgetl.json").read_text())["models"]
    report = {"bundle": str(bundle), "python": sys.executable,
              "cold_start": {backend: cold_start(Path(sys.executable), bundle, {"onnx": "onnxruntime"}.get(backend, backend),
                                                 repeats) for backend in models}}
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "cold_start.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, help="folder for runtime_install.json (cold_start.json with --no-install)")
    parser.add_argument("--no-install", action="store_true", help="only the cold start, with this Python")
    args = parser.parse_args()
    bundle = args.bundle.resolve()
    if args.no_install:
        return cold_start_here(bundle, args.repeats, args.out)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        fresh_venv(Path(tmp) / "bare", None)
        bare = folder_mb(Path(tmp) / "bare")
        for name, requirement, backend in [("edgetl", f"{REPO}", "onnxruntime"),
                                           ("edgetl[openvino]", f"{REPO}[openvino]", "openvino"),
                                           ("edgetl[serve]", f"{REPO}[serve]", "onnxruntime")]:
            folder = Path(tmp) / name.replace("[", "-").rstrip("]")
            python = fresh_venv(folder, requirement)
            freeze = subprocess.run([python, "-m", "pip", "freeze"], capture_output=True, text=True).stdout.split()
            results[name] = {
                "added_mb": round(folder_mb(folder) - bare, 1),
                "packages": len(freeze),
                "torch_absent": absent(python, "torch"),
                "transformers_absent": absent(python, "transformers"),
                "cold_start": cold_start(python, bundle, backend, args.repeats) if name != "edgetl[serve]" else None,
            }
            print(name, json.dumps(results[name]), flush=True)
    sys.path.insert(0, str(REPO))
    from edgetl.bench.machine import describe, machine_info

    report = {"bundle": str(args.bundle), "bare_venv_mb": round(bare, 1), "installs": results,
              "machine": describe(machine_info()), "python": sys.version.split()[0]}
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "runtime_install.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0 if all(r["torch_absent"] and r["transformers_absent"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
