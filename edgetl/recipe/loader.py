"""Finding, reading, overriding and validating a recipe file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from edgetl.errors import RecipeError
from edgetl.recipe.checks import check_architecture, check_chain, check_model, check_target, check_task
from edgetl.recipe.schema import STAGE_NAMES, Recipe

RECIPES_DIR = Path(__file__).resolve().parent.parent.parent / "recipes"


def find_recipe(name_or_path: str) -> Path:
    """A recipe file path, or a shipped recipe's name (``sst-int8`` -> ``recipes/sst-int8.yaml``)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise RecipeError(str(path), ["file not found"])
        return path
    shipped = RECIPES_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    known = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
    raise RecipeError(name_or_path, [f"no such recipe file or shipped recipe (shipped: {known})"])


def apply_override(raw: dict, override: str) -> None:
    """Set ``a.b.c=value`` in the raw recipe dict. A stage is addressed by name or index."""
    key, sep, text = override.partition("=")
    if not sep or not key:
        raise RecipeError("overrides", [f"'{override}': expected key.path=value"])
    value = yaml.safe_load(text) if text else ""
    parts = key.split(".")
    node: Any = raw
    for depth, part in enumerate(parts[:-1]):
        node = _step(node, part, ".".join(parts[: depth + 1]))
    if isinstance(node, list):
        raise RecipeError("overrides", [f"'{key}': cannot replace a whole stage; set one of its fields"])
    if not isinstance(node, dict):
        raise RecipeError("overrides", [f"'{key}': '{'.'.join(parts[:-1])}' is not a section"])
    node[parts[-1]] = value


def _step(node: Any, part: str, where: str) -> Any:
    if isinstance(node, list):
        if part.isdigit() and int(part) < len(node):
            return node[int(part)]
        for item in node:
            if isinstance(item, dict) and item.get("stage") == part:
                return item
        raise RecipeError("overrides", [f"'{where}': no stage named or numbered '{part}'"])
    if isinstance(node, dict):
        return node.setdefault(part, {})
    raise RecipeError("overrides", [f"'{where}' is not a section"])


def load_recipe(name_or_path: str, overrides: list[str] = ()) -> Recipe:
    """Read, override, validate and chain-check a recipe. Raises RecipeError listing every problem."""
    path = find_recipe(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise RecipeError(str(path), [f"not valid YAML: {exc}"]) from None
    if not isinstance(raw, dict):
        raise RecipeError(str(path), ["top level must be a mapping with name, model, data, stages"])
    problems = []
    for override in overrides:
        try:
            apply_override(raw, override)
        except RecipeError as exc:
            problems += [f"overrides: {p}" for p in exc.problems]
    if problems:
        raise RecipeError(str(path), problems)
    model_problems = check_model(raw["model"]) if isinstance(raw.get("model"), str) else []
    problems += model_problems
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(str(path), [_describe(err, raw) for err in exc.errors()] + problems) from None
    problems = check_chain(recipe.stages) + check_target(recipe) + check_task(recipe) + problems
    if not model_problems:
        problems += check_architecture(recipe)
    if problems:
        raise RecipeError(str(path), problems)
    return recipe


def _describe(err: dict, raw: dict) -> str:
    loc = list(err["loc"])
    # Name stages by index and kind: "stages[2] (quantize).onnx_method" beats "stages.2.quantize.onnx_method".
    if len(loc) >= 2 and loc[0] == "stages" and isinstance(loc[1], int):
        if len(loc) >= 3 and loc[2] in STAGE_NAMES:
            del loc[2]
        head = f"stages[{loc[1]}] ({_stage_name(raw, loc[1])})"
        loc = [head] + loc[2:]
    field = ".".join(str(p) for p in loc) or "(top level)"
    message = err["msg"]
    if err["type"] == "extra_forbidden":
        message = "unknown field (misspelt?)"
    elif err["type"] == "union_tag_invalid":
        message = f"unknown stage '{err['input'].get('stage')}'; known stages: {', '.join(STAGE_NAMES)}"
    elif err["type"] == "union_tag_not_found":
        message = f"missing 'stage:' key; known stages: {', '.join(STAGE_NAMES)}"
    elif err["type"] == "value_error":
        message = message.removeprefix("Value error, ")
    return f"{field}: {message}"


def _stage_name(raw: dict, index: int) -> str:
    try:
        return str(raw["stages"][index].get("stage", "?"))
    except (KeyError, IndexError, AttributeError, TypeError):
        return "?"


def resolved_dict(recipe: Recipe) -> dict:
    """The recipe with every default filled in, as written into the run folder."""
    return recipe.model_dump(mode="json")
