"""`edgetl search`: the most accurate model a recipe's chain can make within a latency (and size) budget on this
machine, or the fastest one at or above an accuracy floor.

The recipe names the chain (a teacher, then ``distill`` and ``prune``, then export, INT8, evaluation, benchmark
and bundle); the search chooses its shape: teacher layers kept, head and FFN keep ratios, vocabulary cut, and
for each backend whether INT8 ships and with which of the INT8 settings given (``space["int8"]``: overrides of
the recipe's ``quantize`` stage, e.g. ``{"onnx_method": "static"}``, tried beside the recipe's own).

1. Teacher: the recipe's stages before ``distill`` run once into the search folder (copied from a finished run
   beside it, as ``edgetl run`` does).
2. Latency table: every shape is built untrained from the teacher (its layers spread over the teacher's, units
   ranked by weight magnitude), run through the recipe's own export and quantize stages, and timed at batch 1
   on evaluation texts by the one timing engine, with the reference model in every round; each INT8 setting is
   a target of its own. Latency depends on shapes, not weights, so only shapes within the budget are trained.
   The table is cached per machine.
3. Accuracy, multi-fidelity: Optuna's TPE sampler proposes shapes that fit; each runs ``distill`` and ``prune``
   with the first rung's fraction of their epochs; the best third go on to the next rung (synchronous
   successive halving); the last rung (fraction 1) is the whole recipe, and each further INT8 setting quantizes,
   evaluates and benchmarks the same trained export in a sibling run folder. With ``engine="ray"`` the sampler
   proposes ``workers`` shapes at a time (a constant liar keeps them apart) and their stages up to the benchmark
   train at once as tasks on a Ray cluster (a local one, or ``RAY_ADDRESS``'s; the search folder must be on a file
   system every node sees); each benchmark then runs here, one trial at a time, so no trial is timed beside another.
4. Choice: per backend, INT8 is kept only where the table says it is faster than FP32 and the evaluation says
   it is within the accuracy budget: at or above the floor when one is given, and within ``max_int8_drop`` of FP32
   where that is set (by default 0.5 points when there is no floor). The chosen model's recipe (``chosen.yaml``,
   which ``edgetl run`` reproduces), its bundle, the front (``front.md``, ``front.png``) and ``search.json`` land in the folder.

Everything is kept in the search folder (Optuna's SQLite study, each trial's run folder, the table): running the
same command again resumes, after an interruption or a ``kill -9``, and skips what is finished.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from edgetl.artifact import Artifact, StageOutput, source_commit, write_json_atomic, write_manifest
from edgetl.errors import RecipeError, StageError
from edgetl.pipeline import run_recipe
from edgetl.recipe import Recipe, resolved_dict

log = logging.getLogger("edgetl")

SPACE_DEFAULTS = {"heads_keep": (0.25, 0.5, 0.75, 1.0), "ffn_keep": (0.25, 0.5, 0.75, 1.0)}
PROBE_STAGES = ("export", "quantize")  # what an untrained shape goes through before it is timed


@dataclass(frozen=True)
class Candidate:
    """One shape of the chain: teacher layers kept, head and FFN keep ratios, vocabulary cut or not."""

    layers: int
    heads_keep: float
    ffn_keep: float
    vocabulary: bool

    @property
    def key(self) -> str:
        return f"L{self.layers}-h{self.heads_keep:g}-f{self.ffn_keep:g}" + ("-vocab" if self.vocabulary else "")


@dataclass(frozen=True)
class Goal:
    """What the search optimises: the most accurate model within the budget, or (no latency budget given) the
    fastest at or above the accuracy floor. Latencies in ms, sizes in MB, accuracies in points (0-100)."""

    budget_ms: float | None = None
    budget_ratio: float | None = None  # of the reference model's p50, timed in the same rounds
    max_size_mb: float | None = None
    min_accuracy: float | None = None
    max_drop: float | None = None  # points below the teacher's (FP32) metric
    # INT8 ships on a backend only within this many points of its FP32 model; unset, the floor alone judges INT8
    # when there is one (the user's accuracy budget), else 0.5.
    max_int8_drop: float | None = None

    @property
    def mode(self) -> str:
        return "budget" if self.budget_ms is not None or self.budget_ratio is not None else "fastest"

    def floor(self, teacher_points: float) -> float | None:
        floors = [f for f in (self.min_accuracy, None if self.max_drop is None else teacher_points - self.max_drop)
                  if f is not None]
        return max(floors) if floors else None

    def int8_drop(self, teacher_points: float) -> float | None:
        """Points INT8 may lose against its FP32 model; None: only the floor applies."""
        if self.max_int8_drop is not None:
            return self.max_int8_drop
        return 0.5 if self.floor(teacher_points) is None else None


@dataclass
class Options:
    trials: int = 12  # shapes tried at the first rung
    rungs: tuple[float, ...] = (0.125, 0.5, 1.0)  # fractions of the recipe's distill and prune epochs
    promote: float = 1 / 3  # the share of a rung that goes on to the next
    hours: float | None = None  # no trial starts after this; the best found so far is reported
    latency_texts: int = 300
    latency_rounds: int = 3
    chunk: int = 4  # shapes timed per round beside the reference
    seed: int = 0
    engine: str = "local"  # "ray": the trials of a rung train at once as tasks on a Ray cluster
    workers: int = 1  # trials trained at once (engine "ray")
    threads: int = 1  # CPUs (and torch threads) of each trial on Ray


# ----------------------------------------------------------------------------------------------------- recipes


def _stage_index(raw: dict, stage: str) -> int | None:
    return next((i for i, s in enumerate(raw["stages"]) if s["stage"] == stage), None)


def check_searchable(recipe: Recipe) -> None:
    names = [s.stage for s in recipe.stages]
    problems = [f"stages: the search shapes the student through `{s}`; add a {s} stage" for s in ("distill", "prune")
                if s not in names]
    problems += [f"stages: a latency budget is met by the exported model; add an {s} stage" for s in ("export", "evaluate")
                 if s not in names]
    if "distill" in names and names.index("distill") == 0:
        problems.append("stages: the search needs the teacher's stages (finetune) before distill")
    distill = next((s for s in recipe.stages if s.stage == "distill"), None)
    if distill is not None and distill.student is not None:
        problems.append("distill.student: the search copies layers of the teacher; leave student out")
    if problems:
        raise RecipeError(recipe.name, problems)


def int8_label(settings: dict) -> str:
    """``""`` for the recipe's own INT8 settings, else ``onnx_method=static,smooth_alpha=0.5`` (as ``--int8`` reads it)."""
    def text(value) -> str:
        if isinstance(value, list):
            return "[" + " ".join(text(v) for v in value) + "]"
        return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)

    return ",".join(f"{k}={text(v)}" for k, v in settings.items())


def target_name(backend: str, precision: str, settings: dict) -> str:
    return f"{backend}-{precision}" + (f" {int8_label(settings)}" if settings else "")


def with_int8(raw: dict, settings: dict) -> dict:
    """The recipe with its quantize stage's settings overridden (one INT8 setting the search tries)."""
    raw = copy.deepcopy(raw)
    raw["stages"][_stage_index(raw, "quantize")].update(settings)
    return raw


def teacher_recipe(base: dict) -> dict:
    return {**base, "stages": base["stages"][:_stage_index(base, "distill")]}


def candidate_recipe(base: dict, candidate: Candidate, teacher_layers: int, fraction: float,
                     compare: list[str] | None = None) -> dict:
    """The base recipe with this shape; below fraction 1 only up to ``prune``, with that share of the training."""
    from edgetl.distillation import layer_map

    raw = copy.deepcopy(base)
    stages = raw["stages"]
    distill, prune = stages[_stage_index(raw, "distill")], stages[_stage_index(raw, "prune")]
    distill["layers"] = layer_map(candidate.layers, teacher_layers)[:-1]
    prune.update(heads_keep=candidate.heads_keep, ffn_keep=candidate.ffn_keep, vocabulary=candidate.vocabulary,
                 layers_drop=0, latency_budget_ms=None)
    if fraction < 1:
        for stage in (distill, prune):
            stage["epochs"] = stage["epochs"] * fraction
            if stage.get("max_steps"):
                stage["max_steps"] = max(1, math.ceil(stage["max_steps"] * fraction))
        raw["stages"] = stages[:_stage_index(raw, "prune") + 1]
    if compare is not None:
        raw["bench"]["compare"] = compare
    raw["name"] = f"{base['name']}-{candidate.key}"
    return raw


def _load(raw: dict) -> Recipe:
    from pydantic import ValidationError

    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(raw["name"], [str(exc)]) from None


def _seed_teacher(teacher_run: Path, run_dir: Path, stages: int) -> None:
    """Hard links of a run's first finished stage folders into another run (artifacts are never edited in place);
    a folder there from other inputs (an earlier choice's) is replaced."""
    for index in range(stages):
        source = next(teacher_run.glob(f"{index + 1:02d}-*"), None)
        if source is None:
            continue
        target = run_dir / source.name
        if target.exists() and _fingerprint(target) != _fingerprint(source):
            shutil.rmtree(target)
        if not target.exists():
            run_dir.mkdir(parents=True, exist_ok=True)
            shutil.copytree(source, target, copy_function=os.link)


def _fingerprint(folder: Path) -> str | None:
    manifest = folder / "manifest.json"
    return json.loads(manifest.read_text()).get("fingerprint") if manifest.is_file() else None


# ---------------------------------------------------------------------------------------------- latency table


def machine_fingerprint() -> str:
    from edgetl.bench.machine import machine_info

    info = machine_info()
    versions = {k: v for k, v in info["versions"].items() if k in ("onnxruntime", "openvino", "edgetl")}
    blob = json.dumps([info["cpu"], info["usable_cores"], info["isa_flags"], versions], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _cache_file() -> Path:
    root = Path(os.environ.get("EDGETL_CACHE_DIR", "~/.cache/edgetl")).expanduser()
    return root / "latency" / f"{machine_fingerprint()}.json"


def build_probe(teacher: Path, candidate: Candidate, folder: Path, vocabulary_ids: list[int] | None) -> Artifact:
    """The shape, untrained: the teacher's layers spread as the distill stage takes them, magnitude-pruned."""
    from transformers import AutoTokenizer

    from edgetl.distillation import layer_map, shallow_copy
    from edgetl.modeling import load_classifier
    from edgetl.pruning import apply_plan, magnitude_importance, make_plan
    from edgetl.vocab import prune_vocabulary

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    started = time.time()
    model = load_classifier(teacher)
    model = shallow_copy(model, layer_map(candidate.layers, model.config.num_hidden_layers)[:-1])
    apply_plan(model, make_plan(magnitude_importance(model), candidate.heads_keep, candidate.ffn_keep, 0))
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    if candidate.vocabulary:
        prune_vocabulary(model, tokenizer, vocabulary_ids, tmp)
    else:
        tokenizer.save_pretrained(str(tmp))
    model.save_pretrained(str(tmp))
    output = StageOutput(kind="pytorch-model", precision="fp32", models={"pytorch": {"path": ".", "precision": "fp32"}})
    write_manifest(tmp, output, stage="search-probe", fingerprint=candidate.key, config=asdict(candidate), inputs=[],
                   started=started)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return Artifact.load(folder)


def latency_table(base: dict, candidates: list[Candidate], teacher: Path, reference: Artifact | None,
                  out_dir: Path, options: Options, int8: list[dict] = ({},)) -> dict[str, dict]:
    """``{candidate key: {target name: {"p50_ms", "ratio", "model_mb"}}}`` for every shape, target names as
    ``onnx-int8``, and ``onnx-int8 onnx_method=static`` for the INT8 settings after the recipe's own (``int8[0]``).

    Each chunk of shapes is timed with the reference in the same rounds (fresh processes, order alternating),
    so ``ratio`` (p50 over the reference's) holds even when the machine's speed drifts between chunks.
    """
    from edgetl.backends import Target, targets_of
    from edgetl.bench.measure import Shape, measure, round_ratio
    from edgetl.data import load_labelled
    from edgetl.tasks import task_for

    recipe = _load(base)
    task = task_for(recipe.task)
    dev = load_labelled(recipe.data, task)[1]
    texts = task.examples(dev[:])[:options.latency_texts]
    probe_raw = {**base, "name": "probe", "bench": {**base.get("bench", {}), "compare": []},
                 "stages": [_probe_stage(s) for s in base["stages"] if s["stage"] in PROBE_STAGES]}
    probe_recipes = [_load({**probe_raw, "stages": [_probe_stage(s) for s in with_int8(probe_raw, settings)["stages"]]})
                     for settings in int8]
    ref_target = Target(reference, next(iter(reference.models))) if reference is not None else None
    setting = {"teacher": json.loads((teacher / "config.json").read_text()), "stages": probe_raw["stages"],
               "data": recipe.data.model_dump(mode="json"), "texts": len(texts), "threads": recipe.bench.threads,
               "reference": reference.fingerprint if reference is not None else None}
    cache_path = _cache_file()
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    # The recipe's own INT8 settings keep the key they had before other settings could be searched.
    keys = {(c.key, i): hashlib.sha256(json.dumps([setting, c.key, *([int8_label(s)] if i else [])], sort_keys=True,
                                                  default=str).encode()).hexdigest()
            for c in candidates for i, s in enumerate(int8)}
    table: dict[str, dict] = {}
    for (key, _), hashed in keys.items():
        table.setdefault(key, {}).update(cache.get(hashed, {}))
    missing = {c.key: [i for i in range(len(int8)) if keys[(c.key, i)] not in cache] for c in candidates}
    todo = [c for c in candidates if missing[c.key]]
    if len(todo) < len(candidates):
        log.info("search: %d shapes timed earlier on this machine (%s)", len(candidates) - len(todo), cache_path)
    vocabulary_ids = None
    if any(c.vocabulary for c in todo):
        from transformers import AutoTokenizer

        from edgetl.stages.prune import training_texts
        from edgetl.vocab import used_token_ids

        vocabulary_ids = used_token_ids(AutoTokenizer.from_pretrained(teacher), training_texts(recipe),
                                        next(s for s in recipe.stages if s.stage == "prune").vocab_min_count)
    for start in range(0, len(todo), options.chunk):
        chunk = todo[start:start + options.chunk]
        log.info("search: timing shapes %d-%d of %d untrained (%s)", start + 1, start + len(chunk), len(todo),
                 ", ".join(c.key for c in chunk))
        targets, owner = [], {}
        for candidate in chunk:
            probe_dir = out_dir / candidate.key
            probe = Artifact.load(probe_dir / "model") if (probe_dir / "model" / "manifest.json").is_file() \
                else build_probe(teacher, candidate, probe_dir / "model", vocabulary_ids)
            for i in missing[candidate.key]:
                for artifact in run_recipe(probe_recipes[i], probe_dir / f"run-{i}", seed=[probe])[1:]:
                    artifact.label = f"{candidate.key}/{i}/{artifact.path.name}"  # probes share stage names
                    for target in targets_of([artifact], include_pytorch=False):
                        if i == 0 or target.precision == "int8":  # FP32 does not depend on the INT8 settings
                            targets.append(target)
                            owner[target.key] = (candidate.key, i, target_name(target.backend, target.precision, int8[i]))
        timed = targets + ([ref_target] if ref_target is not None else [])
        rows = measure(timed, texts, [Shape(1, None)], [recipe.bench.threads], max_length=recipe.data.max_length,
                       rounds=options.latency_rounds, warmup=recipe.bench.warmup, max_calls=options.latency_texts,
                       noise_threshold=recipe.bench.noise_threshold, task=task)
        by_key = {r["target"]: r for r in rows}
        ref_p50 = by_key[ref_target.key]["p50_ms"] if ref_target is not None else None
        for target in targets:
            row = by_key[target.key]
            candidate_key, i, name = owner[target.key]
            ratio = None if ref_target is None else round_ratio(row, by_key[ref_target.key])
            entry = {"p50_ms": row["p50_ms"], "ratio": ratio, "reference_p50_ms": ref_p50, "noisy": row["noisy"],
                     "model_mb": round(target.model_bytes / 1e6, 3)}
            table.setdefault(candidate_key, {})[name] = entry
            cache.setdefault(keys[(candidate_key, i)], {})[name] = entry
        for candidate in chunk:
            shutil.rmtree(out_dir / candidate.key, ignore_errors=True)  # the table is what is kept
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(cache_path, cache)
    return table


def _probe_stage(stage: dict) -> dict:
    """An untrained shape goes through the quantizer its trained self will (accuracy control is nncf's graph, not
    ONNX Runtime's, and unsmoothed), with a drop no model exceeds: which layers a trained model returns to FP32
    depends on its weights, so every layer stays INT8 here."""
    return {**stage, "max_accuracy_drop": 100.0} if stage.get("max_accuracy_drop") is not None else stage


# -------------------------------------------------------------------------------------------------- the search


@dataclass
class Searcher:
    recipe: Recipe
    folder: Path
    goal: Goal
    options: Options
    space: dict  # layers, heads_keep, ffn_keep, vocabulary -> the values tried; int8 -> quantize settings
    reference: Artifact | None = None

    def __post_init__(self) -> None:
        from edgetl.pipeline import resolve_compare
        from edgetl.tasks import task_for

        check_searchable(self.recipe)
        self.task = task_for(self.recipe.task)
        self.base = resolved_dict(self.recipe)
        self.int8 = [{}]  # the recipe's own INT8 settings, then each other one asked for
        for settings in self.space.get("int8") or []:
            if _stage_index(self.base, "quantize") is None:
                raise RecipeError(self.recipe.name, ["stages: INT8 settings to search need a quantize stage"])
            own = self.base["stages"][_stage_index(self.base, "quantize")]
            resolved = resolved_dict(_load(with_int8(self.base, settings)))  # names a bad field before anything runs
            if resolved["stages"][_stage_index(self.base, "quantize")] != own and settings not in self.int8:
                self.int8.append(settings)
        # Trials run inside the search folder: the compared runs beside it are named by their folders there.
        self.compared = resolve_compare(self.recipe, self.folder)
        if self.reference is None and self.compared:
            self.reference = self.compared[0]
        if self.goal.budget_ratio is not None and self.reference is None:
            raise RecipeError("--budget-ratio", ["a ratio needs a reference model: give --reference ARTIFACT or "
                                                 "name one in the recipe's bench.compare"])
        self.trial_compare = [str(a.path.resolve()) for a in self.compared]
        if self.reference is not None and str(self.reference.path.resolve()) not in self.trial_compare:
            self.trial_compare.append(str(self.reference.path.resolve()))
        self.teacher_stages = _stage_index(self.base, "distill")

    # -- steps

    def run(self) -> dict:
        started = time.time()
        self.deadline = None if self.options.hours is None else started + self.options.hours * 3600
        self.folder.mkdir(parents=True, exist_ok=True)
        log.info("search: teacher (the recipe's stages before distill)")
        teacher = run_recipe(_load(teacher_recipe(self.base)), self.folder)[-1]
        self.teacher_points = teacher.metrics[self.task.metric] * self.task.metric_scale
        config = json.loads((teacher.path / "config.json").read_text())
        self.teacher_layers = config["num_hidden_layers"]
        layers = self.space.get("layers") or range(1, self.teacher_layers + 1)
        if max(layers) > self.teacher_layers:
            raise RecipeError("--layers", [f"the teacher has {self.teacher_layers} layers; asked for {max(layers)}"])
        prune = self.base["stages"][_stage_index(self.base, "prune")]
        candidates = [Candidate(n, h, f, v) for n in layers for h in self.space.get("heads_keep") or SPACE_DEFAULTS["heads_keep"]
                      for f in self.space.get("ffn_keep") or SPACE_DEFAULTS["ffn_keep"]
                      for v in self.space.get("vocabulary") or (prune["vocabulary"],)]
        self.table = latency_table(self.base, candidates, teacher.path, self.reference, self.folder / "latency",
                                   self.options, self.int8)
        write_json_atomic(self.folder / "latency.json", {"machine": machine_fingerprint(), "shapes": self.table})
        fitting = [c for c in candidates if self.excess(c) <= 1]
        pool = fitting or sorted(candidates, key=self.excess)[:1]
        if not fitting:
            log.warning("search: no shape is within the budget untrained; the nearest, %s, is %.2fx the budget",
                        pool[0].key, self.excess(pool[0]))
        log.info("search: %d of %d shapes within the budget", len(fitting), len(candidates))
        results = self.rungs(pool)
        summary = self.choose(results, fitting, candidates, started)
        write_json_atomic(self.folder / "search.json", summary)
        write_front(summary, self.folder)
        return summary

    def option_fits(self, entry: dict) -> float:
        """How far an option's predicted p50 / size is from the budget: <= 1 fits."""
        over = [0.0]
        if self.goal.budget_ratio is not None:
            over.append(entry["ratio"] / self.goal.budget_ratio)
        if self.goal.budget_ms is not None:
            over.append(entry["p50_ms"] / self.goal.budget_ms)
        if self.goal.max_size_mb is not None:
            over.append(entry["model_mb"] / self.goal.max_size_mb)
        return max(over)

    def excess(self, candidate: Candidate) -> float:
        return min(self.option_fits(e) for e in self.table[candidate.key].values())

    def speed(self, candidate: Candidate) -> float:
        entries = self.table[candidate.key].values()
        return min(e["ratio"] if e["ratio"] is not None else e["p50_ms"] for e in entries)

    def rungs(self, pool: list[Candidate]) -> dict[float, dict[str, dict]]:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        storage = f"sqlite:///{(self.folder / 'optuna.db').resolve()}"
        # One study per goal and pool (the same command resumes it); trial folders are shared by all of them.
        name = hashlib.sha256(json.dumps([asdict(self.goal), [c.key for c in pool]]).encode()).hexdigest()[:12]
        study = optuna.create_study(study_name=f"rung-0-{name}", storage=storage, load_if_exists=True, direction="maximize",
                                    sampler=optuna.samplers.TPESampler(seed=self.options.seed, constant_liar=True))
        for stale in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            study.tell(stale.number, state=optuna.trial.TrialState.FAIL)  # killed mid-trial: its run folder resumes
            study.enqueue_trial(stale.params)
        distributions = {
            "layers": optuna.distributions.CategoricalDistribution(sorted({c.layers for c in pool})),
            "heads_keep": optuna.distributions.CategoricalDistribution(sorted({c.heads_keep for c in pool})),
            "ffn_keep": optuna.distributions.CategoricalDistribution(sorted({c.ffn_keep for c in pool})),
            "vocabulary": optuna.distributions.CategoricalDistribution(sorted({c.vocabulary for c in pool})),
        }
        results: dict[float, dict[str, dict]] = {f: {} for f in self.options.rungs}
        first = self.options.rungs[0]
        for done in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            results[first][Candidate(**done.params).key] = {}  # rerun below: finished stages are skipped
        resumed = list(results[first])
        results[first].update(zip(resumed, self.trials([self.by_key(pool, k) for k in resumed], first), strict=True))
        wanted, refused = min(self.options.trials, len(pool)), 0
        while len(results[first]) < wanted and not self.out_of_time():
            batch: dict[Candidate, optuna.trial.Trial] = {}
            while len(batch) < min(self.options.workers, wanted - len(results[first])):
                trial = study.ask(distributions)
                candidate = Candidate(**trial.params)
                if candidate not in pool or candidate.key in results[first] or candidate in batch:
                    study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                    refused += 1
                    if refused > 50:  # the sampler keeps proposing tried or unfit shapes: take the next untried one
                        untried = next(c for c in pool if c.key not in results[first] and c not in batch)
                        study.enqueue_trial(asdict(untried))
                        refused = 0
                    continue
                batch[candidate] = trial
            for (candidate, trial), result in zip(batch.items(), self.trials(list(batch), first), strict=True):
                results[first][candidate.key] = result
                study.tell(trial, self.score(result, first))
        for previous, fraction in zip(self.options.rungs, self.options.rungs[1:], strict=False):
            ranked = sorted(results[previous], key=lambda k: self.score(results[previous][k], previous), reverse=True)
            promoted = ranked[:max(1, math.ceil(len(ranked) * self.options.promote))]
            for start in range(0, len(promoted), self.options.workers):
                if self.out_of_time():
                    log.warning("search: --hours reached; %s not run at fraction %g", ", ".join(promoted[start:]), fraction)
                    break
                keys = promoted[start:start + self.options.workers]
                results[fraction].update(zip(keys, self.trials([self.by_key(pool, k) for k in keys], fraction), strict=True))
        return results

    @staticmethod
    def by_key(pool: list[Candidate], key: str) -> Candidate:
        return next(c for c in pool if c.key == key)

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.time() > self.deadline

    def score(self, result: dict, fraction: float) -> float:
        """Higher is better. Budget mode: the accuracy estimate. Fastest mode: speed among shapes whose estimate
        is within a rung-dependent slack of the floor (short training underestimates), else the accuracy."""
        points = result["points"]
        floor = self.goal.floor(self.teacher_points)
        if self.goal.mode == "budget" or floor is None:
            return points
        slack = 2.0 * (1 - fraction)
        return 1000 - self.speed(result["candidate"]) if points >= floor - slack else points - 1000

    def trial_recipe(self, candidate: Candidate, fraction: float) -> tuple[Path, dict]:
        """A trial's run folder (seeded with the teacher's stages) and recipe."""
        run_dir = self.folder / "trials" / f"{fraction:g}-{candidate.key}"
        raw = candidate_recipe(self.base, candidate, self.teacher_layers, fraction, self.trial_compare)
        if fraction == 1:  # time the texts the table was timed on, in at least as many rounds
            bench = raw["bench"]
            if bench["max_sentences"] is None:
                bench["max_sentences"] = self.options.latency_texts
            bench["rounds"] = max(bench["rounds"], self.options.latency_rounds)
        _seed_teacher(self.folder, run_dir, self.teacher_stages)
        return run_dir, raw

    def trials(self, candidates: list[Candidate], fraction: float) -> list[dict]:
        """``trial`` of each candidate; on Ray, their stages before the benchmark first train at once there."""
        if self.options.engine == "ray" and candidates:
            self.train_on_ray(candidates, fraction)
        return [self.trial(candidate, fraction) for candidate in candidates]

    def train_on_ray(self, candidates: list[Candidate], fraction: float) -> None:
        from edgetl.cluster import connect_ray

        ray = connect_ray(self.options.workers * self.options.threads, "search --engine ray")
        train = ray.remote(num_cpus=self.options.threads, max_retries=0)(_train_untimed)
        pending = {train.remote(raw, str(run_dir), self.options.threads): candidate
                   for candidate in candidates for run_dir, raw in [self.trial_recipe(candidate, fraction)]}
        log.info("search: %s at %g of the training, on Ray (%d at once)", ", ".join(c.key for c in candidates),
                 fraction, self.options.workers)
        while pending:
            (ready,), _ = ray.wait(list(pending), num_returns=1)
            candidate = pending.pop(ready)
            try:
                ray.get(ready)
            except Exception as exc:  # a trial failed: the others stop too, as one process's search would
                for ref in pending:
                    ray.cancel(ref, force=True)
                cause = getattr(exc, "cause", None) or exc
                raise StageError(f"search: {candidate.key} at {fraction:g} failed on Ray: {cause}") from None
            log.info("search: %s at %g trained on Ray", candidate.key, fraction)

    def trial(self, candidate: Candidate, fraction: float) -> dict:
        run_dir, raw = self.trial_recipe(candidate, fraction)
        log.info("search: %s at %g of the training", candidate.key, fraction)
        artifacts = run_recipe(_load(raw), run_dir)
        stage_seconds = {a.fingerprint: a.manifest["timings"]["seconds"] for a in artifacts[self.teacher_stages:]}
        seconds = sum(stage_seconds.values())
        pruned = next(a for a in artifacts if a.manifest["stage"] == "prune")
        result = {"candidate": candidate, "run_dir": str(run_dir), "seconds": round(seconds, 1), "stage_seconds": stage_seconds,
                  "points": round(pruned.metrics[self.task.metric] * self.task.metric_scale, 3)}
        if fraction == 1:
            result["options"] = self.options_of(candidate, artifacts, run_dir, {})
            for settings in self.int8[1:]:  # the same trained export, quantized otherwise, in a sibling folder
                variant_dir = run_dir.with_name(f"{run_dir.name}+{int8_label(settings)}")
                variant = with_int8(raw, settings)
                _seed_teacher(run_dir, variant_dir, _stage_index(variant, "quantize"))
                log.info("search: %s with INT8 %s", candidate.key, int8_label(settings))
                try:
                    artifacts = run_recipe(_load(variant), variant_dir)
                except StageError as exc:  # e.g. accuracy control that cannot hold its drop: this setting is out
                    log.warning("search: %s with INT8 %s failed: %s", candidate.key, int8_label(settings), exc)
                    why = "quantize failed: " + str(exc).splitlines()[0].replace("|", "/")
                    result["options"] += self.failed_options(candidate, variant_dir, settings, why)
                    continue
                result["options"] += self.options_of(candidate, artifacts, variant_dir, settings)
            self.gate(result["options"])
            result["points"] = max([o["points"] for o in result["options"] if o["ships"]], default=result["points"])
        log.info("search: %s at %g: %s %.2f (%.0f s)", candidate.key, fraction, self.task.metric, result["points"], seconds)
        return result

    def options_of(self, candidate: Candidate, artifacts: list[Artifact], run_dir: Path, settings: dict) -> list[dict]:
        """Every target of a fully trained shape that one run measured (FP32 and INT8 for the recipe's own INT8
        settings, INT8 for the others): its accuracy and its predicted and measured p50."""
        from edgetl.bench.measure import round_ratio

        evaluation = next(a for a in artifacts if a.kind == "evaluation")
        bench = next((a for a in artifacts if a.kind == "benchmark"), None)
        rows = {r["target"]: r for r in json.loads((bench.path / "results.json").read_text())["rows"]} if bench else {}
        names = {a.kind: a.path.name for a in artifacts}
        ref_row = None
        if self.reference is not None:
            backend, model = next(iter(self.reference.models.items()))
            ref_label = f"{self.reference.path.parent.name}/{self.reference.path.name}"
            ref_row = rows.get(f"{backend}-{model['precision']} ({ref_label})")
        table = self.table[candidate.key]
        options = []
        for name, predicted in sorted(table.items()):
            backend, precision = name.split(" ")[0].split("-")
            if name != target_name(backend, precision, settings) or (settings and precision != "int8"):
                continue
            key = f"{backend}-{precision} ({names['quantized' if precision == 'int8' else 'exported']})"
            score = evaluation.metrics.get(key)
            row = rows.get(key, {})
            measured_ratio = round_ratio(row, ref_row) if row and ref_row else None
            options.append({
                "target": name, "points": None if score is None else round(score * self.task.metric_scale, 3),
                "predicted_p50_ms": predicted["p50_ms"], "predicted_ratio": predicted["ratio"],
                "measured_p50_ms": row.get("p50_ms"), "measured_ratio": measured_ratio,
                "model_mb": predicted["model_mb"], "fits": self.option_fits(predicted) <= 1,
                "budget_excess": round(self.option_fits(predicted), 3), "int8": settings, "run_dir": str(run_dir),
            })
        return options

    def failed_options(self, candidate: Candidate, run_dir: Path, settings: dict, error: str) -> list[dict]:
        return [{"target": name, "points": None, "predicted_p50_ms": predicted["p50_ms"],
                 "predicted_ratio": predicted["ratio"], "measured_p50_ms": None, "measured_ratio": None,
                 "model_mb": predicted["model_mb"], "fits": self.option_fits(predicted) <= 1,
                 "budget_excess": round(self.option_fits(predicted), 3), "int8": settings, "run_dir": str(run_dir),
                 "error": error}
                for name, predicted in sorted(self.table[candidate.key].items())
                if name.split(" ")[0].endswith("-int8") and name == target_name(*name.split(" ")[0].split("-"), settings)]

    def gate(self, options: list[dict]) -> None:
        """Whether each option may ship: INT8 only where faster than FP32 and within the accuracy budget (at or
        above the floor, and within ``max_int8_drop`` of FP32 where that applies); the option says why not."""
        drop, floor = self.goal.int8_drop(self.teacher_points), self.goal.floor(self.teacher_points)
        for option in options:
            option["ships"], option["why"] = option["points"] is not None, option.get("error", "")
            if "-int8" in option["target"] and not option.get("error"):
                fp32_name = option["target"].split(" ")[0].replace("int8", "fp32")
                fp32 = next((o for o in options if o["target"] == fp32_name), None)
                if fp32 is not None and option["predicted_p50_ms"] >= fp32["predicted_p50_ms"]:
                    option["ships"], option["why"] = False, "INT8 is not faster than FP32 on this machine"
                elif drop is not None and fp32 is not None and option["points"] is not None \
                        and fp32["points"] is not None and option["points"] < fp32["points"] - drop:
                    option["ships"] = False
                    option["why"] = f"INT8 loses {fp32['points'] - option['points']:.2f} points (max {drop})"
                elif floor is not None and option["points"] is not None and option["points"] < floor:
                    option["ships"], option["why"] = False, f"INT8 scores {option['points']:.2f}, below the floor {floor:.2f}"

    def choose(self, results: dict[float, dict[str, dict]], fitting: list[Candidate], candidates: list[Candidate],
               started: float) -> dict:
        floor = self.goal.floor(self.teacher_points)
        full = results.get(1.0, {})
        options = [{"candidate": key, **o} for key, r in full.items() for o in r["options"] if o["ships"]]
        meets = [o for o in options if o["fits"] and (floor is None or o["points"] >= floor)]
        if self.goal.mode == "budget":
            ordered = sorted(meets, key=lambda o: (-o["points"], o["predicted_p50_ms"]))
            nearest = sorted(options, key=lambda o: (o["budget_excess"], -o["points"]))
        else:
            ordered = sorted(meets, key=lambda o: o["predicted_p50_ms"])
            nearest = sorted(options, key=lambda o: -o["points"])
        chosen = ordered[0] if ordered else (nearest[0] if nearest else None)
        summary = {
            "recipe": self.recipe.name, "mode": self.goal.mode, "goal": asdict(self.goal), "floor": floor,
            "options": {**asdict(self.options), "rungs": list(self.options.rungs)}, "space": self.space,
            "machine": machine_fingerprint(), "edgetl_commit": source_commit(), "teacher_points": round(self.teacher_points, 3), "metric": self.task.metric,
            "reference": None if self.reference is None else str(self.reference.path),
            "shapes": len(candidates), "shapes_within_budget": len(fitting),
            "rungs": {f"{fraction:g}": {k: {**{x: y for x, y in r.items() if x != "candidate"}} for k, r in rows.items()}
                      for fraction, rows in results.items()},
            "front": pareto(options), "met": bool(ordered), "chosen": chosen,
            "seconds": round(time.time() - started, 1),  # this invocation; a resumed search reuses earlier work
            # Trials share stages (same layers and fraction: one distill run): each stage counted once.
            "trial_seconds": round(sum({k: v for rows in results.values() for r in rows.values()
                                        for k, v in r["stage_seconds"].items()}.values()), 1),
        }
        if chosen is None:
            best = max((r for rows in results.values() for r in rows.values()), key=lambda r: r["points"], default=None)
            summary["note"] = ("no shape finished the whole recipe within --hours" if best else "no trial finished") + \
                (f"; the best estimate is {best['candidate'].key} ({best['points']:.2f}) in {best['run_dir']}" if best else "")
            log.warning("search: %s", summary["note"])
            return summary
        if not ordered:
            summary["note"] = (f"nothing met the goal; the nearest is {chosen['candidate']} {chosen['target']}: "
                               f"{chosen['budget_excess']:.2f}x the budget, {chosen['points']:.2f} points"
                               + (f" (floor {floor:.2f})" if floor is not None else ""))
            log.warning("search: %s", summary["note"])
        summary["bundle"] = self.deploy(chosen)
        return summary

    def deploy(self, chosen: dict) -> str | None:
        """``chosen.yaml`` (the recipe ``edgetl run`` reproduces) and its bundle, reusing the trial's training."""
        candidate = Candidate(**_parse_key(chosen["candidate"]))
        backend, precision = chosen["target"].split(" ")[0].split("-")
        raw = candidate_recipe(self.base, candidate, self.teacher_layers, 1.0)
        if chosen.get("int8"):
            raw = with_int8(raw, chosen["int8"])
        raw["name"] = f"{self.recipe.name}-chosen"
        raw["description"] = (f"Found by `edgetl search {self.recipe.name}`: {candidate.key}, {chosen['target']} "
                              f"({self.task.metric} {chosen['points']:.2f}, predicted p50 {chosen['predicted_p50_ms']} ms)")
        for stage in raw["stages"]:
            if stage["stage"] == "bundle":
                stage["backends"] = [backend]
        if precision == "fp32":
            raw["stages"] = [s for s in raw["stages"] if s["stage"] != "quantize"]
        (self.folder / "chosen.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
        if not any(s["stage"] == "bundle" for s in raw["stages"]):
            return None
        run_dir = self.folder / "chosen"
        trial_dir = Path(chosen.get("run_dir") or self.folder / "trials" / f"1-{candidate.key}")
        keep = _stage_index(raw, "quantize") if precision == "int8" else _stage_index(raw, "export") + 1
        _seed_teacher(trial_dir, run_dir, keep)
        artifacts = run_recipe(_load({**raw, "bench": {**raw["bench"], "compare": self.trial_compare}}), run_dir)
        bundle = next(a for a in artifacts if a.kind == "bundle")
        log.info("search: chosen %s %s; recipe %s, bundle %s", candidate.key, chosen["target"],
                 self.folder / "chosen.yaml", bundle.path)
        return str(bundle.path)


def _train_untimed(raw: dict, run_dir: str, threads: int) -> None:
    """A trial's stages before its benchmark, on a Ray worker with ``threads`` CPUs."""
    import torch

    torch.set_num_threads(threads)
    timed = _stage_index(raw, "benchmark")
    run_recipe(_load({**raw, "stages": raw["stages"][:timed]} if timed is not None else raw), Path(run_dir))


def _parse_key(key: str) -> dict:
    parts = key.split("-")
    return {"layers": int(parts[0][1:]), "heads_keep": float(parts[1][1:]), "ffn_keep": float(parts[2][1:]),
            "vocabulary": parts[-1] == "vocab"}


def pareto(options: list[dict]) -> list[dict]:
    """The options no other beats on both accuracy and predicted p50."""
    front = [o for o in options if not any(
        p["points"] >= o["points"] and p["predicted_p50_ms"] <= o["predicted_p50_ms"]
        and (p["points"] > o["points"] or p["predicted_p50_ms"] < o["predicted_p50_ms"]) for p in options)]
    return sorted(front, key=lambda o: o["predicted_p50_ms"])


def write_front(summary: dict, folder: Path) -> None:
    """``front.md``: every fully trained option (front marked) and every shorter trial; ``front.png``: the plot."""
    metric = summary["metric"]
    front = {(o["candidate"], o["target"]) for o in summary["front"]}
    lines = [f"# edgetl search: {summary['recipe']} ({summary['mode']})", "",
             f"Teacher {metric}: {summary['teacher_points']}; floor: {summary['floor']}; "
             f"shapes within the budget: {summary['shapes_within_budget']} of {summary['shapes']}; "
             f"training the trials {summary['trial_seconds'] / 3600:.2f} h (their stages' recorded times); "
             f"this invocation {summary['seconds'] / 3600:.2f} h.", ""]
    if summary.get("note"):
        lines += [f"**{summary['note']}**", ""]
    chosen = summary.get("chosen")
    if chosen:
        lines += [f"Chosen: `{chosen['candidate']}` {chosen['target']}, {metric} {chosen['points']:.2f}, predicted p50 "
                  f"{chosen['predicted_p50_ms']} ms; recipe `chosen.yaml`, bundle `{summary.get('bundle')}`.", ""]
    lines += ["| shape | target | front | ships | " + metric + " | p50 predicted (ms) | x reference | p50 measured (ms) "
              "| x reference | prediction error | MB | fits | why not |", "|" + "---|" * 13]
    for key, result in summary["rungs"].get("1", {}).items():
        for o in result.get("options", []):
            error = None
            if o["measured_ratio"] and o["predicted_ratio"]:
                error = f"{(o['predicted_ratio'] / o['measured_ratio'] - 1) * 100:+.1f} %"
            lines.append(f"| {key} | {o['target']} | {'*' if (key, o['target']) in front else ''} | "
                         f"{'yes' if o['ships'] else 'no'} | {o['points']} | {o['predicted_p50_ms']} | {o['predicted_ratio']} "
                         f"| {o['measured_p50_ms']} | {o['measured_ratio']} | {error or ''} | {o['model_mb']} | "
                         f"{'yes' if o['fits'] else 'no'} | {o['why']} |")
    shorter = [(fraction, k, r) for fraction, rows in summary["rungs"].items() if fraction != "1" for k, r in rows.items()]
    if shorter:
        lines += ["", "Shorter trials (distill and prune with a fraction of their epochs; FP32 PyTorch on the "
                  "evaluation split):", "", f"| fraction | shape | {metric} | seconds |", "|---|---|---|---|"]
        lines += [f"| {fraction} | {k} | {r['points']} | {r['seconds']} |" for fraction, k, r in shorter]
    (folder / "front.md").write_text("\n".join(lines) + "\n")
    options = [{"candidate": k, **o} for k, r in summary["rungs"].get("1", {}).items() for o in r.get("options", [])
               if o["points"] is not None]
    if not options:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for shipped, style in ((False, {"marker": "x", "color": "0.6"}), (True, {"marker": "o", "color": "C0"})):
        chosen_ones = [o for o in options if o["ships"] == shipped]
        ax.scatter([o["predicted_p50_ms"] for o in chosen_ones], [o["points"] for o in chosen_ones],
                   label="ships" if shipped else "does not ship (INT8 slower or worse)", **style)
    line = summary["front"]
    ax.plot([o["predicted_p50_ms"] for o in line], [o["points"] for o in line], color="C1", label="front")
    if chosen:
        ax.scatter([chosen["predicted_p50_ms"]], [chosen["points"]], s=160, facecolors="none", edgecolors="C3",
                   label="chosen")
    ax.set_xlabel("batch-1 p50 predicted from the untrained shape (ms)")
    ax.set_ylabel(f"{metric} (evaluation split)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "front.png", dpi=120)
    plt.close(fig)
