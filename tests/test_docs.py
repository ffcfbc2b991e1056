"""The documentation: generated pages in step with the code and benchmarks/results/, the site builds strictly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_pages_and_readme_blocks_are_current():
    done = subprocess.run([sys.executable, str(ROOT / "docs" / "generate.py"), "--check"], capture_output=True,
                          text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr


def test_the_recipe_reference_describes_every_field_of_every_stage():
    from pydantic import BaseModel

    from edgetl.pipeline import STAGE_CLASSES
    from edgetl.recipe import Recipe

    page = (ROOT / "docs" / "reference" / "recipe.md").read_text(encoding="utf-8")
    rows = {line.split("|")[1].strip().strip("`"): line.split("|")[-2].strip()
            for line in page.splitlines() if line.startswith("| `")}
    missing = []

    def walk(cls: type[BaseModel], prefix: str) -> None:
        for name, field in cls.model_fields.items():
            if name == "stage":
                continue
            if not rows.get(prefix + name):
                missing.append(f"{cls.__name__}.{name}")
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                walk(field.annotation, f"{prefix}{name}.")

    walk(Recipe, "")
    for cls in STAGE_CLASSES.values():
        walk(cls, "")
    assert not missing, "fields without a description in docs/reference/recipe.md: " + ", ".join(missing)


def test_the_site_builds_with_warnings_as_errors(tmp_path):
    done = subprocess.run([str(Path(sys.executable).parent / "mkdocs"), "build", "--strict", "--site-dir",
                           str(tmp_path / "site")], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "site" / "reference" / "recipe" / "index.html").is_file()


def test_recipes_in_the_guides_are_valid(tmp_path):
    import re

    from edgetl.recipe import load_recipe

    blocks = [b for page in sorted((ROOT / "docs" / "guides").glob("*.md"))
              for b in re.findall(r"```yaml\n(.*?)```", page.read_text(encoding="utf-8"), re.S)]
    assert blocks
    for i, block in enumerate(blocks):
        path = tmp_path / f"recipe-{i}.yaml"
        path.write_text(block, encoding="utf-8")
        assert load_recipe(str(path)).stages
