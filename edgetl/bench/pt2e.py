"""PyTorch INT8 through Neural Compressor's PT2E path: what a user who stays in PyTorch would deploy.

``torch.export`` (batch and sequence dynamic) -> ``prepare`` with ``StaticQuantConfig`` (X86InductorQuantizer
defaults) -> calibration on training sentences -> ``convert`` -> ``torch.compile`` (Inductor, weights frozen),
which lowers the quantize/dequantize pairs into INT8 kernels. Uncompiled, the converted graph runs the pairs
as reference ops and is several times slower than FP32, so the benchmark times the compiled model only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgetl.backends import Target, TorchEngine
from edgetl.runtime.text import encode, load_tokenizer
from edgetl.tasks import DEFAULT_TASK, TASKS, Task

INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class PT2EEngine(TorchEngine):
    def __init__(self, folder, threads: int | None, calibration: list[dict]):
        import torch
        from neural_compressor.torch.export import export
        from neural_compressor.torch.quantization import StaticQuantConfig, convert, prepare
        from torch._inductor import config as inductor

        super().__init__(folder, threads)

        class Logits(torch.nn.Module):  # positional inputs and a tensor out, as torch.export wants
            def __init__(self, model):
                super().__init__()
                self.model = model

            def forward(self, input_ids, attention_mask, token_type_ids):
                return self.model(input_ids=input_ids, attention_mask=attention_mask,
                                  token_type_ids=token_type_ids).logits

        longest = self.model.config.max_position_embeddings
        batch, seq = torch.export.Dim("batch", min=1, max=1024), torch.export.Dim("seq", min=2, max=longest)
        example = next(f for f in calibration if f["input_ids"].shape[0] > 1 and f["input_ids"].shape[1] > 2)
        exported = export(Logits(self.model).eval(), self._tensors(example),
                          dynamic_shapes=tuple({0: batch, 1: seq} for _ in INPUTS))
        prepared = prepare(exported, StaticQuantConfig())
        with torch.no_grad():
            for feed in calibration:
                prepared(*self._tensors(feed))
        inductor.freezing = True
        self.compiled = torch.compile(convert(prepared), dynamic=True)
        with torch.no_grad():
            self.compiled(*self._tensors(example))  # compiles now, not in the first timed call

    def _tensors(self, feed: dict) -> tuple:
        return tuple(self._torch.from_numpy(feed[k]) for k in INPUTS)

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        with self._torch.no_grad():
            return self.compiled(*self._tensors(feeds)).float().numpy()


@dataclass(frozen=True)
class PT2ETarget(Target):
    """A PyTorch model artifact quantized to INT8 by Neural Compressor (PT2E) when opened."""

    calibration: tuple = ()  # feeds from training sentences
    optional = True  # where PT2E cannot take the model, the benchmark skips it with a note

    @property
    def precision(self) -> str:
        return "int8"

    @property
    def key(self) -> str:
        return f"pytorch-int8 [inc-pt2e] ({self.artifact.name})"

    @property
    def label(self) -> str:
        return f"{self.artifact.name} (INC PT2E)"

    def open(self, threads: int | None = None, task: Task = TASKS[DEFAULT_TASK]):
        if task.name != DEFAULT_TASK:
            raise NotImplementedError(f"PT2E INT8 is timed for {DEFAULT_TASK} models only, not {task.name}")
        return PT2EEngine(self.folder, threads, list(self.calibration))


def pt2e_variants(targets: list[Target], train_texts: list[str], max_length: int) -> list[Target]:
    """Neural Compressor PT2E INT8 of each PyTorch CPU target, calibrated on 96 training sentences."""
    variants = []
    for target in targets:
        if target.backend == "pytorch" and target.device == "cpu":
            tokenizer = load_tokenizer(target.folder, max_length)
            calibration = tuple(encode(tokenizer, train_texts[i:i + 8]) for i in range(0, 96, 8))
            variants.append(PT2ETarget(target.artifact, "pytorch", calibration=calibration))
    return variants
