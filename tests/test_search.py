"""`edgetl search` on the tiny model: end to end within the budget (with a second INT8 setting beside the recipe's),
nothing within the budget, the fastest-at-a-floor mode, resuming after kill -9, and trials spread over Ray."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import copy_run

from edgetl.recipe import load_recipe

# One backend and two shapes keep a whole search within a minute or two on two cores.
SMALL = ["stages.export.formats=[onnx]", "stages.quantize.backends=[onnx]", "stages.quantize.onnx_method=dynamic",
         "stages.bundle.backends=[onnx]"]


# INT8 settings beside the recipe's own (SMALL: dynamic): ONNX Runtime's static INT8, and static INT8 under the
# recipe's accuracy control (NNCF's quantizer).
STATIC = {"onnx_method": "static", "max_accuracy_drop": None}
CONTROLLED = {"onnx_method": "static"}


def _searcher(recipe, folder: Path, int8=(STATIC, CONTROLLED), latency_rounds=1, **goal):
    from edgetl.search import Goal, Options, Searcher

    options = Options(trials=2, rungs=(0.5, 1.0), promote=0.5, latency_texts=20, latency_rounds=latency_rounds)
    space = {"layers": [1], "heads_keep": (0.5, 1.0), "ffn_keep": (0.5,), "vocabulary": (False,), "int8": list(int8)}
    return Searcher(recipe, folder, Goal(**goal), options, space)


@pytest.fixture(scope="module")
def search_root(tmp_path_factory, tiny_runs):
    root = tmp_path_factory.mktemp("search")
    copy_run(tiny_runs("sst-int8"), root / "sst-int8")  # the compared run, as `runs/sst-int8` beside the search
    return root


@pytest.fixture(autouse=True)
def latency_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("EDGETL_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "edgetl-cache"))


@pytest.fixture(scope="module")
def within_budget(search_root, shrink, tmp_path_factory):
    recipe = load_recipe("sst-tiny", [*shrink("sst-tiny"), *SMALL])
    folder = search_root / "sst-tiny-search"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EDGETL_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "edgetl-cache"))
        return folder, _searcher(recipe, folder, latency_rounds=2, budget_ratio=100.0).run()


@pytest.mark.slow
def test_the_search_chooses_a_shape_within_the_budget_and_ships_its_bundle(within_budget, shrink):
    folder, summary = within_budget
    assert summary["met"] and summary["shapes_within_budget"] == 2
    assert set(summary["rungs"]["0.5"]) == {"L1-h0.5-f0.5", "L1-h1-f0.5"}
    assert len(summary["rungs"]["1"]) == 1  # the better half went on to the whole recipe
    chosen = summary["chosen"]
    assert chosen["fits"] and chosen["ships"] and chosen["candidate"] in summary["rungs"]["1"]
    full = summary["rungs"]["1"][chosen["candidate"]]["options"]
    assert chosen["points"] == max(o["points"] for o in full if o["ships"] and o["fits"])
    # Every option has its prediction from the untrained shape and its measurement in its run's benchmark; the
    # other INT8 settings quantized the same trained export in sibling runs.
    assert all(o["predicted_ratio"] > 0 and o["measured_ratio"] > 0 for o in full)
    # ... measured over the texts and as many rounds as the prediction (the recipe's bench.rounds is 1 here)
    rows = json.loads(next(Path(chosen["run_dir"]).glob("*-benchmark/results.json")).read_text())["rows"]
    assert {len(r["round_p50_ms"]) for r in rows} == {2}
    assert sorted(o["target"] for o in full) == ["onnx-fp32", "onnx-int8", "onnx-int8 onnx_method=static",
                                                  "onnx-int8 onnx_method=static,max_accuracy_drop=null"]
    static = next(o for o in full if o["int8"] == STATIC)
    assert static["run_dir"].endswith("+onnx_method=static,max_accuracy_drop=null")
    assert json.loads(next(Path(static["run_dir"]).glob("*-quantize/manifest.json")).read_text())[
        "config"]["onnx_method"] == "static"
    recipe = load_recipe(str(folder / "chosen.yaml"))
    prune = next(s for s in recipe.stages if s.stage == "prune")
    assert (prune.heads_keep, prune.ffn_keep) == (float(chosen["candidate"].split("-")[1][1:]), 0.5)
    if chosen["target"].startswith("onnx-int8"):  # the chosen INT8 settings are the reproduced recipe's
        quantize = next(s for s in recipe.stages if s.stage == "quantize")
        assert quantize.onnx_method == chosen["int8"].get("onnx_method", "dynamic")
    bundle = json.loads((Path(summary["bundle"]) / "edgetl.json").read_text())
    precision = chosen["target"].split(" ")[0].split("-")[1]
    assert list(bundle["models"]) == ["onnx"] and bundle["models"]["onnx"]["precision"] == precision
    assert chosen["candidate"] in (folder / "front.md").read_text() and (folder / "front.png").stat().st_size > 0
    cache = list((Path(os.environ["EDGETL_CACHE_DIR"]) / "latency").glob("*.json"))
    assert len(cache) == 1 and len(json.loads(cache[0].read_text())) == 6  # 2 shapes x 3 INT8 settings


@pytest.mark.slow
def test_an_int8_setting_whose_quantize_stage_fails_is_reported_and_the_search_goes_on(within_budget, shrink,
                                                                                       monkeypatch):
    import edgetl.search
    from edgetl.errors import StageError

    folder, before = within_budget
    real = edgetl.search.run_recipe

    def accuracy_control_fails(recipe, run_dir, **kwargs):
        if run_dir.name.endswith("+onnx_method=static"):  # the CONTROLLED setting's sibling run
            raise StageError("accuracy control (onnx): every operation went back to FP32 |\nmore")
        return real(recipe, run_dir, **kwargs)

    monkeypatch.setattr(edgetl.search, "run_recipe", accuracy_control_fails)
    recipe = load_recipe("sst-tiny", [*shrink("sst-tiny"), *SMALL])
    summary = _searcher(recipe, folder, budget_ratio=100.0).run()  # same folder: the rest is reused
    full = summary["rungs"]["1"][before["chosen"]["candidate"]]["options"]
    failed = next(o for o in full if o["int8"] == CONTROLLED)
    assert not failed["ships"] and failed["points"] is None
    assert failed["why"] == "quantize failed: accuracy control (onnx): every operation went back to FP32 /"
    assert summary["met"] and summary["chosen"]["int8"] != CONTROLLED
    assert failed["why"] in (folder / "front.md").read_text()


@pytest.mark.slow
def test_nothing_within_the_budget_still_ships_the_nearest_and_says_how_far(within_budget, shrink):
    folder, _ = within_budget
    recipe = load_recipe("sst-tiny", [*shrink("sst-tiny"), *SMALL])
    summary = _searcher(recipe, folder, budget_ms=1e-6).run()  # same folder: the table and trials are reused
    assert not summary["met"] and summary["shapes_within_budget"] == 0
    chosen = summary["chosen"]
    assert not chosen["fits"] and chosen["budget_excess"] > 1000
    assert f"{chosen['budget_excess']:.2f}x the budget" in summary["note"]
    assert Path(summary["bundle"], "edgetl.json").is_file() and (folder / "chosen.yaml").is_file()


@pytest.mark.slow
def test_the_fastest_mode_returns_the_fastest_option_at_or_above_the_floor(within_budget, shrink):
    folder, _ = within_budget
    recipe = load_recipe("sst-tiny", [*shrink("sst-tiny"), *SMALL])
    summary = _searcher(recipe, folder, min_accuracy=0.0).run()
    assert summary["mode"] == "fastest" and summary["met"]
    shipped = [o for r in summary["rungs"]["1"].values() for o in r["options"] if o["ships"]]
    assert summary["chosen"]["predicted_p50_ms"] == min(o["predicted_p50_ms"] for o in shipped)


@pytest.mark.slow
def test_a_search_killed_mid_trial_resumes_without_redoing_finished_stages(search_root, shrink):
    folder = search_root / "killed-search"
    args = [sys.executable, "-m", "edgetl", "search", "sst-tiny", *shrink("sst-tiny"), *SMALL, "--budget-ratio", "100",
            "--layers", "1", "--heads", "0.5,1", "--ffn", "0.5", "--vocabulary", "no", "--trials", "2", "--rungs", "0.5,1",
            "--latency-texts", "20", "--latency-rounds", "1", "--search-dir", str(folder)]
    process = subprocess.Popen(args, cwd=search_root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and not list(folder.glob("trials/*/02-distill/manifest.json")):
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        time.sleep(0.5)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    distilled = next(folder.glob("trials/*/02-distill/manifest.json"))
    before = json.loads(distilled.read_text())["timings"]
    done = subprocess.run(args, cwd=search_root, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(distilled.read_text())["timings"] == before  # finished before the kill: not trained again
    summary = json.loads((folder / "search.json").read_text())
    assert summary["met"] and len(summary["rungs"]["0.5"]) == 2
    import optuna

    storage = f"sqlite:///{folder / 'optuna.db'}"
    (name,) = optuna.get_all_study_names(storage)
    states = [t.state.name for t in optuna.load_study(study_name=name, storage=storage).trials]
    assert "RUNNING" not in states and states.count("COMPLETE") == 2


def _interval(manifest: Path) -> tuple[float, float]:
    timings = json.loads(manifest.read_text())["timings"]
    return timings["started_unix"], timings["started_unix"] + timings["seconds"]


def _overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


@pytest.mark.slow
def test_trials_spread_over_a_local_ray_cluster_train_at_once_and_are_timed_one_at_a_time(search_root, shrink):
    pytest.importorskip("ray")
    folder = search_root / "ray-search"
    args = [sys.executable, "-m", "edgetl", "search", "sst-tiny", *shrink("sst-tiny"), *SMALL, "--budget-ratio", "100",
            "--layers", "1", "--heads", "0.5,1", "--ffn", "0.5", "--vocabulary", "no", "--trials", "2", "--rungs", "0.5,1",
            "--latency-texts", "20", "--latency-rounds", "1", "--search-dir", str(folder),
            "--engine", "ray", "--workers", "2", "--threads", "1"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(args, cwd=search_root, capture_output=True, text=True, timeout=1200, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "on Ray (2 at once)" in done.stderr
    summary = json.loads((folder / "search.json").read_text())
    assert summary["met"] and summary["options"]["engine"] == "ray"
    assert len(summary["rungs"]["0.5"]) == 2 and len(summary["rungs"]["1"]) == 1
    first = [_interval(m) for m in sorted(folder.glob("trials/0.5-*/02-distill/manifest.json"))]
    assert len(first) == 2 and _overlap(*first), "the first rung's two shapes trained at once"
    (benchmark,) = folder.glob("trials/1-*/*-benchmark/manifest.json")
    training = [_interval(m) for m in folder.glob("trials/*/0[2-6]-*/manifest.json")]
    assert not any(_overlap(_interval(benchmark), t) for t in training), "timed with no trial training beside it"
    import optuna

    storage = f"sqlite:///{folder / 'optuna.db'}"
    (name,) = optuna.get_all_study_names(storage)
    states = [t.state.name for t in optuna.load_study(study_name=name, storage=storage).trials]
    assert "RUNNING" not in states and states.count("COMPLETE") == 2


def test_workers_and_threads_without_ray_a_worker_count_below_one_and_a_bad_promote_share_are_refused(tmp_path):
    from edgetl.cli import main
    from edgetl.errors import UsageError

    base = ["--debug", "search", "sst-tiny", "--budget-ms", "1", "--search-dir", str(tmp_path / "s")]
    with pytest.raises(UsageError, match="--workers and --threads go with --engine ray"):
        main([*base, "--workers", "2"])
    with pytest.raises(UsageError, match="--workers must be at least 1, got 0"):
        main([*base, "--engine", "ray", "--workers", "0"])
    with pytest.raises(UsageError, match="--promote is the share of a rung"):
        main([*base, "--promote", "0"])
    assert not (tmp_path / "s").exists()


def test_a_recipe_without_distill_and_prune_or_a_bad_int8_setting_is_refused_before_anything_runs(tmp_path, shrink):
    from edgetl.errors import RecipeError

    recipe = load_recipe("sst-int8", shrink("sst-int8"))
    with pytest.raises(RecipeError, match="add a distill stage"):
        _searcher(recipe, tmp_path / "s", budget_ms=1.0)
    recipe = load_recipe("sst-tiny", shrink("sst-tiny"))
    with pytest.raises(RecipeError, match="onnx_method"):
        _searcher(recipe, tmp_path / "s", int8=[{"onnx_method": "fast"}], budget_ms=1.0)
    assert not (tmp_path / "s").exists()


def test_int8_is_judged_by_the_floor_when_one_is_given_and_by_half_a_point_otherwise():
    from types import SimpleNamespace

    from edgetl.search import Goal, Searcher

    def shipped(**goal) -> dict[str, bool]:
        options = [{"target": "onnx-fp32", "points": 90.25, "predicted_p50_ms": 1.0},
                   {"target": "onnx-int8", "points": 89.68, "predicted_p50_ms": 0.5},
                   {"target": "openvino-fp32", "points": 90.25, "predicted_p50_ms": 1.0},
                   {"target": "openvino-int8", "points": 90.14, "predicted_p50_ms": 1.2}]
        Searcher.gate(SimpleNamespace(goal=Goal(**goal), teacher_points=90.94), options)
        return {o["target"]: o["ships"] for o in options}

    no_floor = shipped(budget_ratio=0.5)
    assert no_floor["onnx-int8"] is False and no_floor["onnx-fp32"] is True  # loses 0.57 > 0.5
    assert shipped(budget_ratio=0.5, max_drop=2.0)["onnx-int8"] is True  # above the floor (88.94): the floor judges
    assert shipped(max_drop=1.0)["onnx-int8"] is False  # below the floor (89.94): that backend ships FP32
    assert shipped(max_drop=2.0, max_int8_drop=0.5)["onnx-int8"] is False  # an explicit limit still applies
    assert shipped(max_drop=2.0)["openvino-int8"] is False  # slower than FP32: never ships


def test_a_ratio_to_the_reference_is_read_round_by_round_so_a_slow_spell_of_the_machine_cancels():
    from edgetl.bench.measure import round_ratio

    # Rounds 3-5 ran while the machine was twice as slow; the reference caught it in rounds 3-4 only.
    model = {"p50_ms": 1.2, "round_p50_ms": [0.6, 0.6, 1.2, 1.2, 1.2]}
    reference = {"p50_ms": 1.5, "round_p50_ms": [1.5, 1.5, 3.0, 3.0, 1.5]}
    assert round_ratio(model, reference) == 0.4  # the p50s' ratio would say 0.8
    assert round_ratio({"p50_ms": 1.2}, reference) == 0.8  # no rounds recorded: the p50s
