"""Stages that make a model smaller or faster: distill, prune, export, quantize."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from edgetl.recipe.base import Backend, Declared, DistillationConfig, _Strict


class TransferText(DistillationConfig):
    """Distillation whose transfer set may grow by unlabelled text the teacher labels (TinyBERT's augmented data)."""

    extra_text_file: str | None = Field(None, description="Unlabelled text (jsonl/csv/tsv with data.text_field, or "
                                        ".txt, one text per line) added to the training texts: soft targets only for a "
                                        "classifier, the teacher's vectors for an embedding model.")
    extra_text_field: str | None = Field(None, description="The column of extra_text_file (csv/tsv/jsonl) that holds "
                                         "the text; default: data.text_field.")
    extra_text_sentences: bool = Field(False, description="Split each extra text into sentences (after . ! ? and a "
                                       "space, and at line breaks), for a task whose texts are single sentences.")


class DistillStage(TransferText, Declared):
    """Knowledge distillation into a smaller student: a shallower copy of the teacher, or a named pretrained model."""

    takes: ClassVar[tuple[str, ...]] = ("pytorch-model",)
    reads: ClassVar[frozenset[str]] = frozenset({"data"})
    distributed: ClassVar[bool] = True

    stage: Literal["distill"]
    teacher: str | None = Field(None, description="Folder of a saved model of the task (default: the run's last PyTorch model).")
    student: str | None = Field(None, description="Pretrained model for the student (catalog name, folder or hub id); "
                                "default: a copy of the teacher keeping `layers`.")
    layers: list[int] | None = Field(None, min_length=1, description="Teacher layers the student keeps "
                                     "(default: every other layer from the first, as DistilBERT).")
    depth: int | None = Field(None, ge=1, description="Instead of layers: keep this many teacher layers, those whose "
                              "untrained copy reproduces the teacher's outputs best (the objective's loss on "
                              "training texts); every subset is tried where there are at most 200, else layers are "
                              "dropped one at a time. The scores land in the stage's metrics. Measured: it chose well "
                              "for an embedding student (stsb-embed-tiny); for a classifier's soft targets it chose "
                              "sst-tiny's top layers, which trained worse than every other layer (docs/experiments/"
                              "sst-tiny.md).")
    epochs: float = Field(3.0, gt=0)
    learning_rate: float = Field(1e-4, gt=0, lt=1)
    @model_validator(mode="after")
    def _student_or_layers(self) -> DistillStage:
        if self.student is not None and self.layers is not None:
            raise ValueError("give either student (a pretrained model) or layers (a copy of the teacher), not both")
        if self.depth is not None and (self.student is not None or self.layers is not None):
            raise ValueError("depth chooses the teacher layers a copy keeps: give it without student and layers")
        if self.layers is not None and len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers {self.layers} repeats a layer")
        return self

    def inputs(self) -> tuple[str, ...]:
        return () if self.teacher else self.takes  # a teacher folder is read by the stage itself


class PruneStage(TransferText, Declared):
    """Structured pruning (heads, FFN neurons, whole layers) rebuilt as smaller Linear layers, then vocabulary.

    The extra text joins recovery only; importance is scored on the labelled training rows.
    """

    takes: ClassVar[tuple[str, ...]] = ("pytorch-model",)
    reads: ClassVar[frozenset[str]] = frozenset({"data"})
    distributed: ClassVar[bool] = True

    stage: Literal["prune"]
    importance: Literal["fisher", "taylor", "magnitude"] = Field(
        "taylor", description="How heads, neurons and layers are ranked on training data: fisher sums each text's "
        "squared gradient of a gate on the unit (Kwon et al. 2022), taylor the |gradient| of a gate on each "
        "batch's mean loss (Michel et al. 2019), magnitude uses weight norms.")
    importance_samples: int = Field(2048, ge=1, description="Training sentences used to score heads, neurons and layers.")
    heads_keep: float = Field(1.0, gt=0, le=1, description="Fraction of attention heads kept (ranked over all layers).")
    ffn_keep: float = Field(1.0, gt=0, le=1, description="Fraction of FFN intermediate neurons kept (ranked over all layers).")
    layers_drop: int = Field(0, ge=0, description="Whole layers removed (the least important ones).")
    latency_budget_ms: float | None = Field(
        None, gt=0, description="Instead of heads_keep/ffn_keep: the largest common keep ratio (1.0, 0.9, ... 0.1) "
        "whose ONNX Runtime FP32 batch-1 p50 on evaluation texts, measured on this machine, is within this budget.")
    vocabulary: bool = Field(False, description="Drop embedding rows of tokens the training text never uses and "
                             "rewrite the tokenizer to match.")
    vocab_min_count: int = Field(1, ge=1, description="Keep tokens seen at least this often in the training text.")
    vocabulary_extra_text: bool = Field(
        False, description="With vocabulary: the tokens of extra_text_file count as training text too, so the words "
        "recovery learns on it stay in the model (at the size of their embedding rows).")
    vocabulary_in_recovery: bool = Field(
        True, description="With vocabulary and recovery: recovery already reads the tokens the cut will drop as "
        "[UNK], so it trains and picks its checkpoint on the inputs the pruned model ships with (the extra text "
        "teaches it words the training split lacks); false: recovery sees the whole vocabulary and the cut comes after.")
    recovery: bool = Field(True, description="Distil the pruned model after structured pruning, from recovery_teacher.")
    recovery_teacher: Literal["unpruned", "first"] = Field(
        "unpruned", description="What recovery distils from: the model before pruning, or the run's first PyTorch "
        "model (the fine-tuned teacher that a distill stage copied the student from).")
    epochs: float = Field(1.0, gt=0)
    kd_weight: float = Field(0.8, ge=0, le=1)

    @model_validator(mode="after")
    def _layer_scores(self) -> PruneStage:
        if self.layers_drop and self.importance == "magnitude":
            raise ValueError("layers_drop ranks layers by gradient scores; set importance: fisher or taylor")
        if self.latency_budget_ms is not None and (self.heads_keep < 1 or self.ffn_keep < 1):
            raise ValueError("latency_budget_ms chooses the keep ratio itself; leave heads_keep and ffn_keep at 1")
        if self.vocabulary and self.vocabulary_extra_text and not self.extra_text_file:
            raise ValueError("vocabulary_extra_text keeps the tokens of extra_text_file in the pruned vocabulary; set "
                             "extra_text_file")
        return self

    def inputs(self) -> tuple[str, ...]:
        if self.structured and self.recovery and self.recovery_teacher == "first":
            return ("first:pytorch-model", *self.takes)
        return self.takes

    @property
    def structured(self) -> bool:
        return self.heads_keep < 1 or self.ffn_keep < 1 or self.layers_drop > 0 or self.latency_budget_ms is not None


class ExportStage(_Strict, Declared):
    """PyTorch FP32 model -> ONNX (optimum exporter + ORT fusions) and/or OpenVINO IR."""

    takes: ClassVar[tuple[str, ...]] = ("pytorch-model",)

    stage: Literal["export"]
    formats: list[Backend] = Field(default_factory=lambda: ["onnx", "openvino"], min_length=1,
                                   description="What to export to: onnx, openvino or both.")
    opset: int = Field(17, ge=14, le=21, description="ONNX opset of the exported graph.")
    optimize: bool = Field(True, description="Apply ONNX Runtime's transformer fusions to the ONNX model.")


class QATConfig(DistillationConfig):
    """Quantization-aware training: the fake-quantized model learns from its FP32 self."""

    epochs: float = Field(1.0, gt=0)
    learning_rate: float = Field(2e-5, gt=0, lt=1)
    kd_weight: float = Field(0.8, ge=0, le=1)
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "fp32", description="fp32: bf16 autocast would compute the fake-quantizers' scales and rounding in bf16.")


class QuantizeStage(_Strict, Declared):
    """INT8: post-training on exported models (optionally accuracy-controlled), or quantization-aware training."""

    reads: ClassVar[frozenset[str]] = frozenset({"data"})

    stage: Literal["quantize"]
    method: Literal["ptq", "qat", "weights"] = Field(
        "ptq", description="ptq: quantize exported models; qat: NNCF fake-quantizers on the PyTorch model, trained "
        "with distillation, then exported to INT8; weights: weight-only INT8 or INT4 of an exported decoder's MatMuls "
        "(ONNX Runtime's MatMulNBits quantizer, NNCF compress_weights for OpenVINO), activations stay float.")
    bits: Literal[4, 8] = Field(4, description="method weights: 8 (INT8) or 4 (INT4) bits per weight.")
    group_size: int = Field(32, ge=16, description="method weights: weights sharing one scale along the input "
                            "dimension (a power of two; OpenVINO's INT8 is per output channel instead).")
    algorithm: Literal["rtn", "awq"] = Field(
        "rtn", description="method weights: rtn rounds each weight to the nearest level (data-free, symmetric); awq "
        "(INT4 only) is NNCF's AWQ then scale estimation, asymmetric, calibrated on calibration_samples training "
        "texts: it weighs each weight by the activations it meets, which round to nearest cannot see.")
    backends: list[Backend] = Field(default_factory=lambda: ["onnx", "openvino"], min_length=1,
                                    description="Exported models to quantize: onnx, openvino or both.")
    max_accuracy_drop: float | None = Field(
        None, gt=0, le=100, description="PTQ only: accuracy points a static INT8 model may lose on the evaluation "
        "split; the most sensitive layers stay in FP32 until it holds (nncf.quantize_with_accuracy_control). "
        "Applies to OpenVINO, and to ONNX when onnx_method is static (dynamic INT8 has no calibrated layers to revert).")
    qat: QATConfig = Field(default_factory=QATConfig, description="Training settings for method: qat.")
    onnx_method: Literal["static", "dynamic"] = Field(
        "static", description="ONNX Runtime QDQ with calibration, or dynamic INT8 (of ORT's fused graph, one "
        "QAttention per layer, where the export fused it and no node left in FP32 is one the fusion absorbed).")
    calibration_samples: int = Field(300, ge=1, description="Texts that calibrate activations: training sentences, "
                                     "or data.target's unlabelled training texts when it is set (what the model will serve).")
    per_channel: bool = Field(True, description="ONNX Runtime: one weight scale per output channel, not one per tensor.")
    onnx_embedding_bits: Literal[4, 8] = Field(
        8, description="ONNX Runtime PTQ (not QAT): bits per weight of the word-embedding table. 4: symmetric, one scale per 32 "
        "values of a row (GatherBlockQuantized, ONNX Runtime's contrib op), about 0.6x the INT8 table's bytes, so a "
        "size budget holds more vocabulary.")
    onnx_calibration: Literal["minmax", "percentile"] = Field("minmax", description="Static activation ranges: min/max or 99.999th percentile.")
    onnx_dynamic_ffn_down: bool = Field(
        True, description="Static INT8 everywhere except the FFN down-projections, which get dynamic INT8 "
        "(cuts the logit error about 3x; see benchmarks/ort_int8_configs.py).")
    smooth_alpha: float | None = Field(
        None, ge=0, le=1, description="ONNX Runtime PTQ: SmoothQuant before INT8, moving activation outliers into the "
        "weights (strength alpha, measured on the calibration texts); none: off. OpenVINO's nncf.quantize already "
        "smooths MatMuls (alpha 0.95) under its transformer preset.")
    min_cosine: float = Field(
        0.99, gt=0, le=1, description="sentence-embedding (fidelity control): a backend's INT8 model ships as it is "
        "if, on held-out training texts, the mean cosine between its vectors and the FP32 model's is at least this, "
        "their 1st percentile at least min_cosine_p1, and its recall@10 agreement at least min_recall_at_10; else "
        "the MatMul roles (every layer's FFN output, ...) that cost most leave dynamic INT8 one at a time until it "
        "holds in FP32. On ONNX Runtime those nodes are then tried, fastest first, in dynamic INT8 with their 4 "
        "largest input channels (measured on the calibration texts) split off in FP32, as LLM.int8() does, then in "
        "block-wise INT8 (8-bit MatMulNBits, an INT8 activation range per block of 128 channels), and ship in the "
        "first way that holds too, else in FP32; if nothing holds, that backend ships its FP32 model. The manifest "
        "records the fidelity of each way tried and the nodes left out (outlier_split_nodes, blockwise_int8_nodes "
        "or fp32_nodes).")
    min_cosine_p1: float = Field(0.97, gt=0, le=1, description="sentence-embedding: see min_cosine.")
    min_recall_at_10: float | None = Field(0.95, gt=0, le=1, description="sentence-embedding: see min_cosine; null: "
                                           "not checked.")
    fidelity_samples: int = Field(2000, ge=10, description="sentence-embedding: training texts after the calibration "
                                  "ones on which fidelity is measured (recall@10 among them: more texts, nearer "
                                  "neighbours, a harder bar).")

    @model_validator(mode="after")
    def _awq_is_int4(self) -> QuantizeStage:
        if (self.onnx_embedding_bits == 4 and self.method == "ptq" and self.onnx_method == "static"
                and self.max_accuracy_drop is not None):
            raise ValueError("onnx_embedding_bits 4 applies to ONNX Runtime PTQ without accuracy control: onnx_method "
                             "dynamic, or static without max_accuracy_drop")
        if self.algorithm == "awq" and (self.method != "weights" or self.bits != 4):
            raise ValueError("algorithm awq calibrates weight-only INT4: set method: weights and bits: 4 (INT8 "
                             "weights lose little by rounding alone)")
        return self

    def inputs(self) -> tuple[str, ...]:
        return ("pytorch-model",) if self.method == "qat" else ("exported",)


class ShardStage(_Strict, Declared):
    """The bundle's models cut at layer boundaries into parts that run as a pipeline of worker processes, one core
    each (``edgetl shard``): a model no single process may hold runs as parts that each fit."""

    takes: ClassVar[tuple[str, ...]] = ("bundle",)

    stage: Literal["shard"]
    parts: int = Field(2, ge=2, description="Parts per model (at most the model's layers); the cuts go where the "
                       "slowest part, timed layer by layer on this machine, is fastest.")
    formats: list[Backend] | None = Field(None, min_length=1, description="Which of the bundle's models to shard "
                                          "(default: all); the others stay whole.")
    max_part_mb: float | None = Field(None, gt=0, description="Cap on each part's model file, in MB.")

