"""What every part of the recipe schema shares: strict pydantic models, the backend and task names, the training
options, and what a stage declares to the pipeline (``Declared``)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from edgetl.tasks import TASKS

Backend = Literal["onnx", "openvino"]
TaskName = Literal[tuple(TASKS)]


class _Strict(BaseModel):
    # extra="forbid" turns a misspelt key into an error instead of a silently used default.
    model_config = ConfigDict(extra="forbid", frozen=True)


class TrainingConfig(_Strict):
    """Optimizer, schedule and checkpointing of a stage that trains (HF Trainer; best dev checkpoint kept)."""

    epochs: float = Field(2.0, gt=0, description="Passes over the training data (fractions allowed).")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps (overrides epochs).")
    learning_rate: float = Field(5e-5, gt=0, lt=1, description="Peak learning rate (AdamW), reached after the warm-up, then linear decay to 0.")
    batch_size: int = Field(32, ge=1, description="Training texts per step on each process.")
    eval_batch_size: int = Field(128, ge=1, description="Texts per batch when evaluating.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    warmup_ratio: float = Field(0.06, ge=0, lt=1, description="Fraction of the steps over which the learning rate rises linearly from 0.")
    eval_steps: int = Field(200, ge=1, description="Evaluate and checkpoint every this many steps.")
    group_by_length: bool = Field(True, description="Batch texts of similar length (about 3x faster on SST-2), "
                                  "the batches in random order.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="Mixed precision for training; auto = bf16 where the CPU or GPU computes it natively.")
    keep: Literal["best", "last"] = Field(
        "best", description="best: the checkpoint with the best accuracy on the labelled data's dev split (an "
        "embedding student: the lowest MSE to its teacher's vectors on held-out training texts); last: the final "
        "weights, never evaluated during training (few-shot: the only dev split is the test split).")
    seed: int = Field(42, description="Seed of initialisation, dropout and batch order.")


class Declared:
    """What a stage declares to the pipeline, in one place (its config class), so the pipeline keeps no per-stage code.

    Attributes:
        takes: the earlier artifacts it reads, in order: an artifact kind (the latest one of that kind), 'a|b' (the
            latest a, else the latest b), 'first:KIND' (the earliest one of that kind), 'models' (every model
            artifact so far), 'compared' (``bench.compare``'s).
            A stage whose inputs depend on its settings overrides ``inputs``.
        reads: the recipe sections besides its own config that its work depends on ('model', 'data', 'bench');
            they are hashed into its fingerprint, so a change to one of them reruns it.
        distributed: it trains, so every rank runs it under torchrun / accelerate launch (rank 0 alone runs the rest).
    """

    takes: ClassVar[tuple[str, ...]] = ()
    reads: ClassVar[frozenset[str]] = frozenset()
    distributed: ClassVar[bool] = False

    def inputs(self) -> tuple[str, ...]:
        return self.takes


class DistillationConfig(TrainingConfig):
    """Training against a teacher: soft targets, optionally hidden states and attention maps (TinyBERT)."""

    temperature: float = Field(2.0, gt=0, description="Softmax temperature of the soft targets.")
    kd_weight: float = Field(0.5, ge=0, le=1, description="Weight of the soft-target loss; the task loss gets 1 - kd_weight.")
    hidden_weight: float = Field(0.0, ge=0, description="Weight of the MSE between matched hidden states "
                                 "(through a learned projection when the widths differ).")
    attention_weight: float = Field(0.0, ge=0, description="Weight of the KL between matched layers' head-averaged "
                                    "attention distributions.")
