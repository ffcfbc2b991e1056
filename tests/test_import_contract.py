"""Imports run one way: every contract under [tool.importlinter] in pyproject.toml is kept."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_every_import_contract_in_pyproject_is_kept():
    lint_imports = Path(sys.executable).parent / "lint-imports"  # the venv's, beside its python
    done = subprocess.run([str(lint_imports), "--no-cache"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    broken = [line for line in done.stdout.splitlines() if line.endswith(" BROKEN")]
    report = "\n".join(["broken import contracts:", *broken, "", done.stdout, done.stderr])
    assert done.returncode == 0, report
