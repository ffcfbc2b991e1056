"""Recipe schema, loading, overrides and whole-chain checks.

A recipe is data: ``name``, ``task``, ``model``, ``data``, ``stages`` and ``bench``. Every default lives in the
schema (``data`` for the data section, one module per stage family: ``training``, ``compression``, ``measure``;
``schema`` for the whole); ``checks`` refuses what cannot run, ``loader`` reads a file and its overrides.
Validation never imports torch, so a bad recipe fails in well under a second.
"""

from edgetl.recipe.base import Backend, Declared, DistillationConfig, TaskName, TrainingConfig
from edgetl.recipe.compression import (
    DistillStage,
    ExportStage,
    PruneStage,
    QATConfig,
    QuantizeStage,
    ShardStage,
    TransferText,
)
from edgetl.recipe.data import DataConfig
from edgetl.recipe.loader import RECIPES_DIR, apply_override, find_recipe, load_recipe, resolved_dict
from edgetl.recipe.measure import BenchConfig, BenchmarkStage, BundleStage, EvaluateStage
from edgetl.recipe.schema import STAGE_CLASSES, STAGE_NAMES, Recipe, StageConfig
from edgetl.recipe.training import (
    AdaptStage,
    AugmentStage,
    DomainAdversarialConfig,
    FinetuneStage,
    MetaStage,
    PretrainedStage,
    SelfTrainStage,
)

__all__ = [
    "RECIPES_DIR", "STAGE_CLASSES", "STAGE_NAMES", "AdaptStage", "AugmentStage", "Backend", "BenchConfig",
    "BenchmarkStage", "BundleStage", "DataConfig", "Declared", "DistillStage", "DistillationConfig",
    "DomainAdversarialConfig", "EvaluateStage", "ExportStage", "FinetuneStage", "MetaStage", "PretrainedStage", "PruneStage", "QATConfig",
    "QuantizeStage", "Recipe", "SelfTrainStage", "ShardStage", "StageConfig", "TaskName", "TrainingConfig", "TransferText", "apply_override",
    "find_recipe", "load_recipe", "resolved_dict",
]
