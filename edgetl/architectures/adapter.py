"""What an architecture declares: where its parts live, as attribute paths, and what edgetl can do to it.

Data only, no torch: recipe validation reads the support flags before anything is imported.
``edgetl.architectures.torch_ops`` turns the paths into modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edgetl.errors import ArchitectureError

OPERATIONS = {"head_pruning": "head pruning", "ffn_pruning": "FFN pruning", "layer_selection": "layer selection",
              "mean_pooling": "mean pooling", "openvino": "OpenVINO"}


@dataclass(frozen=True)
class ConfigKeys:
    """The ``config.json`` keys that hold the sizes (DistilBERT names all four differently)."""

    hidden: str = "hidden_size"
    heads: str = "num_attention_heads"
    intermediate: str = "intermediate_size"
    layers: str = "num_hidden_layers"
    head_size: str | None = None  # a key that overrides hidden // heads when present


@dataclass(frozen=True)
class Adapter:
    """Where one HF ``model_type`` keeps its blocks, like optimum's ``NormalizedConfig`` but for modules.

    Paths are dotted attribute names: ``layers`` and ``word_embeddings`` inside the base model
    (``getattr(model, base)``), everything else inside one layer of that list. The output projection
    ``output`` reads the concatenated head contexts and ``ffn_out`` the activated FFN neurons; pruning
    gates and cuts exactly those inputs, whatever the rest of the block looks like.
    """

    model_type: str
    base: str
    layers: str
    attention: str  # the module holding the head-count attributes below
    query: str
    key: str
    value: str
    output: str
    ffn_in: str
    ffn_out: str
    word_embeddings: str
    heads_attr: str = "num_attention_heads"
    head_size_attr: str = "attention_head_size"
    all_head_size_attr: str = "all_head_size"
    # Further Linears with one row block per head that exist only under some configs (pruned with Q, K, V).
    optional_head_projections: tuple[str, ...] = ()
    layer_output_index: int = 0  # where a layer's output tuple holds the hidden states
    config_keys: ConfigKeys = field(default_factory=ConfigKeys)
    takes_token_type_ids: bool = True  # the tokenizer returns them and the exported graph declares them
    pad_token_id: int = 0
    ort_fusion: str | None = "bert"  # onnxruntime.transformers optimizer model_type; None skips fusion
    head_pruning: bool = True
    ffn_pruning: bool = True
    layer_selection: bool = True
    mean_pooling: bool = True  # edgetl's mean-pooled classifier and embedding heads over the base model
    openvino: bool = True  # the ONNX export converts to an OpenVINO model the CPU plugin compiles
    # "decoder": a causal language model (GPT-style), compressed by weight-only INT8/INT4, exported with its KV cache.
    family: str = "encoder"
    reasons: dict[str, str] = field(default_factory=dict)  # why, for each operation declared False

    def __post_init__(self):
        for operation in OPERATIONS:
            if not getattr(self, operation) and not self.reasons.get(operation):
                raise ValueError(f"adapter {self.model_type}: {operation} is False but no reason is given")
        if self.family not in ("encoder", "decoder"):
            raise ValueError(f"adapter {self.model_type}: family must be encoder or decoder, not {self.family!r}")
        stray = set(self.reasons) - {op for op in OPERATIONS if not getattr(self, op)}
        if stray:
            raise ValueError(f"adapter {self.model_type}: reasons given for supported operations {sorted(stray)}")

    @property
    def input_names(self) -> tuple[str, ...]:
        """What the model's forward takes of a tokenizer's output."""
        return ("input_ids", "attention_mask") + (("token_type_ids",) if self.takes_token_type_ids else ())

    def supports(self, operation: str) -> bool:
        if operation not in OPERATIONS:
            raise ValueError(f"unknown operation '{operation}'; known: {', '.join(OPERATIONS)}")
        return getattr(self, operation)

    def require(self, operation: str) -> None:
        """Raise ``ArchitectureError`` naming the architecture and the reason if ``operation`` is unsupported."""
        if not self.supports(operation):
            raise ArchitectureError(f"{self.model_type}: {OPERATIONS[operation]} is not supported: "
                                    f"{self.reasons[operation]}")
