"""What an app pays for the runtime: install size of each runtime extra in a fresh venv, and cold start.

    .venv/bin/python benchmarks/runtime_install.py runs/sst-int8/06-bundle --out benchmarks/results

For each of `edgetl` (ONNX Runtime), `edgetl[openvino]` and `edgetl[serve]`: a fresh virtual environment,
`pip install` of this checkout, the size of what the install added (MB, the venv minus a bare venv), a check
that torch and transformers are absent, and the cold start of BUNDLE in that venv: a new Python process
that imports `edgetl.runtime`, loads the bundle (checksums verified) and classifies one text, timed from
before the import to after the prediction (median of `--repeats` processes).
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
import sys, time
start = time.perf_counter()
from edgetl.runtime import TextClassifier
classifier = TextClassifier.load(sys.argv[1], backend=sys.argv[2])
prediction = classifier.predict_one("a gorgeous, witty, seductive movie.")
elapsed = time.perf_counter() - start
assert "torch" not in sys.modules and "transformers" not in sys.modules
print(elapsed, prediction.label)
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
    times, label = [], None
    for _ in range(repeats):
        out = subprocess.run([python, "-c", COLD_START, str(bundle), backend], capture_output=True, text=True,
                             check=True, cwd=tempfile.gettempdir()).stdout.split()
        times.append(float(out[0]))
        label = out[1]
    return {"median_s": round(statistics.median(times), 3), "max_s": round(max(times), 3), "runs": repeats,
            "label": label}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, help="folder for runtime_install.json")
    args = parser.parse_args()
    bundle = args.bundle.resolve()
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
