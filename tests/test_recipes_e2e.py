"""Every shipped recipe runs end to end on the tiny model (found with rglob, so a new YAML is covered at once)."""

from __future__ import annotations

import pytest

from conftest import RECIPES as RECIPES_DIR
from conftest import shipped_recipes, stage_names

RECIPES = shipped_recipes()


def test_recipes_are_found():
    assert len(RECIPES) > 0


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_runs_end_to_end_on_the_tiny_model(recipe, tiny_runs):
    from edgetl.artifact import Artifact

    # Top-level recipes run by name, as users type them (and share the session's sst-int8 run); others by path.
    run_dir = tiny_runs(recipe.stem if recipe.parent == RECIPES_DIR else recipe)
    names = stage_names(recipe)
    folders = [run_dir / f"{i + 1:02d}-{name}" for i, name in enumerate(names)]
    for folder in folders:
        artifact = Artifact.load(folder)
        artifact.verify()
        assert artifact.manifest["stage"] == folder.name.split("-", 1)[1]
    assert sorted(p.name for p in run_dir.glob("[0-9][0-9]-*")) == [f.name for f in folders]
    assert (run_dir / "recipe.resolved.yaml").is_file()
    assert not any((run_dir / ".tmp").glob("*")), "a finished run leaves nothing in .tmp"
    if "bundle" in names:
        import json
        import math

        import numpy as np

        from edgetl.runtime import Entity, Generation, Prediction, load

        runtime = load(folders[names.index("bundle")])  # the runtime of the recipe's task
        # What the bundle says its model reads is what the runtime asks for (an embedder: single texts).
        assert json.loads((folders[names.index("bundle")] / "edgetl.json").read_text())["text_pair"] is runtime.text_pair
        texts = ["a gorgeous , witty film", "dull and lifeless"]
        results = runtime.predict([(t, t) for t in texts] if runtime.text_pair else texts)
        assert len(results) == 2
        for result in results:
            if isinstance(result, Prediction):
                assert result.label in runtime.labels
            elif isinstance(result, list):
                assert all(isinstance(e, Entity) and e.type in {t[2:] for t in runtime.labels} for e in result)
            elif isinstance(result, Generation):  # a prompt's continuation
                assert result.token_ids and result.finish_reason in ("stop", "length")
            elif isinstance(result, np.ndarray):  # a sentence vector
                assert result.shape == (runtime.dimension,) and np.isfinite(result).all()
            else:
                assert math.isfinite(result)
