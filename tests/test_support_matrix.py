"""README's support matrix is generated from the task and architecture declarations, never typed by hand."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edgetl.errors import UsageError
from edgetl.support import END, START, replace_block, support_matrix

README = Path(__file__).resolve().parent.parent / "README.md"
REGENERATE = ".venv/bin/edgetl support --write README.md"


def test_readme_support_matrix_is_the_generated_one():
    text = README.read_text(encoding="utf-8")
    assert text.count(START) == 1 and text.count(END) == 1, f"README.md needs one {START} ... {END} block"
    block = text[text.index(START):text.index(END) + len(END)] + "\n"
    assert block == support_matrix(), f"README.md's support matrix is stale: run `{REGENERATE}` and commit README.md"


def test_every_task_stage_option_and_architecture_has_a_row_or_column():
    from edgetl.architectures import ADAPTERS
    from edgetl.recipe import STAGE_NAMES
    from edgetl.tasks import OPTIONS, TASKS

    matrix = support_matrix()
    for name in [*TASKS, *STAGE_NAMES, *ADAPTERS]:
        assert f"`{name}`" in matrix, name
    assert all(option in matrix for option in OPTIONS)


def test_replacing_the_block_leaves_the_rest_of_the_page_alone():
    page = f"before\n{START}\nold table\n{END}\nafter\n"
    assert replace_block(page, f"{START}\nnew\n{END}\n") == f"before\n{START}\nnew\n{END}\nafter\n"
    with pytest.raises(UsageError, match="no generated block"):
        replace_block("no markers here\n", "x")


def test_generating_the_matrix_imports_no_torch():
    code = ("import sys; from edgetl.support import support_matrix; support_matrix(); "
            "print(sorted({'torch', 'transformers', 'datasets'} & set(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
