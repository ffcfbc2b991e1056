"""Whole-recipe checks run at load, before any work: the chain of stages, the target domain, the task, the
architecture and the model. Each returns the problems it finds, every one naming its stage and field."""

from __future__ import annotations

from pathlib import Path

from edgetl.architectures.adapter import OPERATIONS
from edgetl.corpora import KNOWN_DATASETS, target_files
from edgetl.recipe.compression import DistillStage, ExportStage, PruneStage, QuantizeStage
from edgetl.recipe.measure import BenchmarkStage, BundleStage, EvaluateStage
from edgetl.recipe.schema import Recipe
from edgetl.recipe.training import AdaptStage, AugmentStage, FinetuneStage, MetaStage, PretrainedStage, SelfTrainStage
from edgetl.tasks import OPTIONS, WEIGHTS_ONLY_FOR_DECODERS, task_for


def check_target(recipe: Recipe) -> list[str]:
    """``data.target`` names files that exist, and stages that read target-domain text have one."""
    if recipe.data.target:
        try:
            missing = [str(f) for f in target_files(recipe.data.target) if not f.is_file()]
        except Exception as exc:  # DataError naming the field
            return [str(exc)]
        meta = [_source_problems(s, f"stages[{i}] (meta).sources", recipe.data.target)
                for i, s in enumerate(recipe.stages) if isinstance(s, MetaStage)]
        return ([f"data.target: {', '.join(missing)} not found"] if missing else []) + [p for ps in meta for p in ps]
    problems = []
    for index, stage in enumerate(recipe.stages):
        if isinstance(stage, MetaStage):
            problems += _source_problems(stage, f"stages[{index}] (meta).sources", recipe.data.target)
        if isinstance(stage, AdaptStage) and stage.text == "target":
            problems.append(f"stages[{index}] (adapt).text: 'target' needs data.target (a domain or folder)")
        if isinstance(stage, FinetuneStage) and stage.domain_adversarial is not None:
            problems.append(f"stages[{index}] (finetune).domain_adversarial: needs data.target, whose texts are "
                            "the unlabelled target domain")
        if isinstance(stage, SelfTrainStage):
            problems.append(f"stages[{index}] (self_train): needs data.target, whose texts it pseudo-labels")
    return problems


def _source_problems(stage: MetaStage, where: str, target: str | None) -> list[str]:
    """A meta stage's sources exist and are not the target domain (whose dev split is the test set)."""
    problems = []
    for source in stage.sources:
        if source == "sst2":
            continue
        try:
            train = target_files(source)[0]
        except Exception as exc:  # DataError naming what a source may be
            problems.append(f"{where}: {exc}".replace("data.target: ", ""))
            continue
        if not train.is_file():
            problems.append(f"{where}: '{source}': {train} not found")
        if target and Path(target_files(target)[0]).resolve() == Path(train).resolve():
            problems.append(f"{where}: '{source}' is data.target; meta-learning must not see the target's labels")
    return problems


def check_task(recipe: Recipe) -> list[str]:
    """The task supports every stage and stage setting (``edgetl.tasks.OPTIONS``) of the recipe, and its data section."""
    task = task_for(recipe.task)
    problems = []
    known = KNOWN_DATASETS.get(recipe.data.dataset)
    if known is not None and task.name not in known.tasks:
        problems.append(f"data.dataset: '{recipe.data.dataset}' holds {' or '.join(known.tasks)} data, but the task is "
                        f"{task.name}: set task: {known.tasks[0]}, or choose data of task {task.name}")
    problems += task.check_data(recipe.data)
    for index, stage in enumerate(recipe.stages):
        where = f"stages[{index}] ({stage.stage})"
        reason = task.refusal(stage.stage)
        if reason is not None:
            problems.append(f"{where}: task {task.name} does not support the {stage.stage} stage: {reason}")
            continue
        if isinstance(stage, FinetuneStage) and stage.method == "cloze" and recipe.data.text_pair_field is not None:
            problems.append(f"{where}.cloze: a pattern places one text ({{text}}); data.text_pair_field names pairs")
        if isinstance(stage, FinetuneStage) and task.pooling is not None and stage.pooling is None:
            problems.append(f"{where}.pooling: the {task.name} head reads one vector per text: choose mean or cls")
        for option in _options(stage):
            if (reason := task.refusal(option)) is not None:
                problems.append(f"{where}.{OPTIONS[option][1]}: task {task.name} does not support {option}: {reason}")
    return problems


def _options(stage) -> list[str]:
    """The stage settings (``edgetl.tasks.OPTIONS``) a stage uses."""
    if isinstance(stage, QuantizeStage):
        used = [stage.method]
        return used + (["max_accuracy_drop"] if stage.max_accuracy_drop is not None else [])
    if isinstance(stage, DistillStage):
        return ["student"] if stage.student is not None else []
    if not isinstance(stage, FinetuneStage):
        return []
    used = ["pooling"] if stage.pooling is not None and stage.method != "cloze" else []
    used += [stage.method] if stage.method != "full" else []
    used += ["domain_adversarial"] if stage.domain_adversarial is not None else []
    return used + (["rdrop_alpha"] if stage.rdrop_alpha is not None else [])


def check_chain(stages: list) -> list[str]:
    """Simulate what each stage has available and refuse impossible orders before any work starts."""
    problems: list[str] = []
    pytorch_model = False
    adapted = False
    prompt_tuned = cloze = meta = None
    exported: set[str] = set()
    quantized: set[str] = set()
    seen: set[str] = set()
    for index, stage in enumerate(stages):
        where = f"stages[{index}] ({stage.stage})"
        if isinstance(stage, (AdaptStage, AugmentStage, MetaStage)) and pytorch_model:
            problems.append(f"{where}: {stage.stage} feeds fine-tuning; move it before the finetune stage")
        if isinstance(stage, AdaptStage):
            adapted = True
        if isinstance(stage, MetaStage):
            meta = where
        if isinstance(stage, FinetuneStage) and stage.method == "cloze" and meta is not None:
            problems.append(f"{where}: method cloze answers with a language-model head, and {meta} (meta) leaves a "
                            "classifier without one; put meta before a finetune with method full or lora")
        if isinstance(stage, AugmentStage) and "contextual" in stage.operations and not (adapted or stage.mlm_model):
            problems.append(f"{where}.operations: 'contextual' needs a masked language model: add an adapt stage "
                            "before it or set mlm_model")
        if prompt_tuned is not None and isinstance(stage, (SelfTrainStage, DistillStage, PruneStage, ExportStage,
                                                             QuantizeStage)):
            problems.append(f"{where}: the model of {prompt_tuned} (method prompt-tuning) keeps its soft prompt "
                            f"outside the encoder weights, which {stage.stage} cannot take; use method lora "
                            "(merged into the weights) or full, or end the chain with evaluate")
        if cloze is not None and isinstance(stage, (SelfTrainStage, DistillStage, PruneStage)):
            problems.append(f"{where}: the model of {cloze} (method cloze) answers through its language-model head, "
                            f"which {stage.stage} does not train or cut; export, quantize, evaluate and bundle take it")
        if isinstance(stage, FinetuneStage):
            prompt_tuned = where if stage.method == "prompt-tuning" else prompt_tuned
            cloze = where if stage.method == "cloze" else None
        if isinstance(stage, PretrainedStage) and pytorch_model:
            problems.append(f"{where}: pretrained makes the run's first PyTorch model; move it to the start")
        if isinstance(stage, (PretrainedStage, FinetuneStage, SelfTrainStage, DistillStage, PruneStage)):
            if exported:
                problems.append(f"{where}: {stage.stage} after export would leave the exported models stale; move it before export")
            if isinstance(stage, (PruneStage, SelfTrainStage)) and not pytorch_model:
                problems.append(f"{where}: {stage.stage} needs a PyTorch model; add a finetune stage before it")
            if isinstance(stage, DistillStage) and not pytorch_model and stage.teacher is None:
                problems.append(f"{where}.teacher: no teacher; name a folder or add a finetune stage before distill")
            if isinstance(stage, PruneStage) and not (stage.structured or stage.vocabulary):
                problems.append(f"{where}: prunes nothing; set heads_keep, ffn_keep or layers_drop, or vocabulary: true")
            pytorch_model = True
        elif isinstance(stage, ExportStage):
            if not pytorch_model:
                problems.append(f"{where}: export needs a PyTorch model; add a finetune stage before it")
            if quantized:
                problems.append(f"{where}: export after quantize would feed an INT8 model to the exporter; export the FP32 model and quantize after export")
            exported |= set(stage.formats)
        elif isinstance(stage, QuantizeStage):
            problems += _check_quantize(stage, where, pytorch_model, exported)
            exported |= set(stage.backends)
            quantized |= set(stage.backends)
        elif isinstance(stage, (EvaluateStage, BenchmarkStage)):
            if not pytorch_model:
                problems.append(f"{where}: nothing to measure; it needs a model stage before it")
        elif isinstance(stage, BundleStage):
            missing = [b for b in stage.backends if b not in exported]
            if missing:
                problems.append(f"{where}.backends: {missing} not exported by an earlier stage")
        if stage.stage in seen and stage.stage in ("pretrained", "adapt", "augment", "finetune", "self_train", "evaluate", "benchmark", "bundle"):
            problems.append(f"{where}: stage '{stage.stage}' appears twice")
        seen.add(stage.stage)
    return problems


def _check_quantize(stage: QuantizeStage, where: str, pytorch_model: bool, exported: set[str]) -> list[str]:
    if stage.method == "qat":
        problems = [] if pytorch_model else [f"{where}: method qat trains the PyTorch model; add a finetune stage before it"]
        if stage.max_accuracy_drop is not None:
            problems.append(f"{where}.max_accuracy_drop: applies to method ptq; QAT recovers accuracy by training")
        return problems
    problems = []
    missing = [b for b in stage.backends if b not in exported]
    if missing:
        problems.append(f"{where}.backends: {missing} not exported yet; quantize works on exported models, so add an export stage with those formats before it")
    return problems


def _operations(stage) -> list[str]:
    """The architecture operations (``edgetl.architectures.adapter.OPERATIONS``) a stage performs."""
    backends = getattr(stage, "formats", None) or getattr(stage, "backends", None) or []
    if "openvino" in backends and not isinstance(stage, BundleStage):  # a bundle only copies what was made
        return ["openvino"]
    if isinstance(stage, DistillStage) and stage.student is None:
        return ["layer_selection"]  # the student copies some of the teacher's layers
    if isinstance(stage, FinetuneStage) and stage.pooling == "mean" and stage.method != "cloze":
        return ["mean_pooling"]
    if not isinstance(stage, PruneStage):
        return []
    budget = stage.latency_budget_ms is not None
    return ([op for op, used in (("head_pruning", stage.heads_keep < 1 or budget),
                                 ("ffn_pruning", stage.ffn_keep < 1 or budget),
                                 ("layer_selection", stage.layers_drop > 0)) if used])


def check_architecture(recipe: Recipe) -> list[str]:
    """The architecture of a local model (``model_type`` of its ``config.json``, read without torch) supports every
    operation the recipe's stages perform on it. A hub id is checked when the model is loaded."""
    from edgetl.architectures import ADAPTERS, adapter_for, model_type_of
    from edgetl.models import resolve_model_source

    folder = Path(resolve_model_source(recipe.model))
    if not (folder / "config.json").is_file():
        return []
    model_type, problems = model_type_of(folder), []
    for index, stage in enumerate(recipe.stages):
        where = f"stages[{index}] ({stage.stage})"
        if isinstance(stage, QuantizeStage) and stage.method == "weights" and (
                model_type not in ADAPTERS or adapter_for(model_type).family != "decoder"):
            problems.append(f"{where}.method: {model_type} is no decoder: {WEIGHTS_ONLY_FOR_DECODERS}")
        for operation in _operations(stage):
            if model_type not in ADAPTERS and operation == "openvino":
                continue  # conversion needs no module paths: an architecture without an adapter may still convert
            if model_type not in ADAPTERS:
                problems.append(f"{where}: model type '{model_type}' has no edgetl adapter, so its layers, heads and "
                                f"FFN neurons cannot be found; known types: {', '.join(sorted(ADAPTERS))}")
                break
            if not (adapter := adapter_for(model_type)).supports(operation):
                problems.append(f"{where}: {model_type} does not support {OPERATIONS[operation]}: "
                                f"{adapter.reasons[operation]}")
    return problems


def check_model(model: str) -> list[str]:
    from edgetl.models import resolve_model_source  # light: no torch

    try:
        resolve_model_source(model)
    except Exception as exc:  # ModelNotFoundError carries the user-facing text
        return [f"model: {exc}"]
    return []
