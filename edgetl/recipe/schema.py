"""The whole recipe: its sections, and the stages by name."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, model_validator

from edgetl.recipe.base import Declared, TaskName, _Strict
from edgetl.recipe.compression import DistillStage, ExportStage, PruneStage, QuantizeStage, ShardStage
from edgetl.recipe.data import DataConfig
from edgetl.recipe.measure import BenchConfig, BenchmarkStage, BundleStage, EvaluateStage
from edgetl.recipe.training import AdaptStage, AugmentStage, FinetuneStage, MetaStage, PretrainedStage, SelfTrainStage
from edgetl.tasks import DEFAULT_TASK, TASKS


StageConfig = Annotated[
    PretrainedStage | AdaptStage | AugmentStage | MetaStage | FinetuneStage | SelfTrainStage | DistillStage | PruneStage | ExportStage | QuantizeStage
    | EvaluateStage | BenchmarkStage | BundleStage | ShardStage,
    Field(discriminator="stage"),
]
STAGE_CLASSES: dict[str, type[Declared]] = {
    cls.model_fields["stage"].annotation.__args__[0]: cls
    for cls in (PretrainedStage, AdaptStage, AugmentStage, MetaStage, FinetuneStage, SelfTrainStage, DistillStage, PruneStage, ExportStage,
                QuantizeStage, EvaluateStage, BenchmarkStage, BundleStage, ShardStage)
}
STAGE_NAMES = tuple(STAGE_CLASSES)



class Recipe(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="The run's folder name under runs/ (letters, digits, _ . -).")
    task: TaskName = Field(DEFAULT_TASK, description="What the model learns: text-classification (a label per text "
                           "or pair of texts), token-classification (a tag per word), text-regression (a score per "
                           "text or pair), sentence-embedding (a vector per text). Text generation is to come.")
    description: str = Field("", description="One line for people; no stage reads it.")
    model: str = Field(description="Catalog name (minilm-l6), local folder, or hub id.")
    data: DataConfig = Field(default_factory=DataConfig, description="Where the labelled (and unlabelled) texts come from.")
    stages: list[StageConfig] = Field(min_length=1, description="The chain, in order; each entry names its `stage:`.")
    bench: BenchConfig = Field(default_factory=BenchConfig, description="How the benchmark stage measures.")

    @model_validator(mode="before")
    @classmethod
    def _task_defaults(cls, raw: Any) -> Any:
        # finetune.pooling defaults to the task's: mean where the head reads one vector per text, else none.
        if not isinstance(raw, dict) or raw.get("task", DEFAULT_TASK) not in TASKS or not isinstance(raw.get("stages"), list):
            return raw
        pooling = TASKS[raw.get("task", DEFAULT_TASK)].pooling
        stages = [{"pooling": pooling, **s} if isinstance(s, dict) and s.get("stage") == "finetune" else s
                  for s in raw["stages"]]
        return {**raw, "stages": stages}
