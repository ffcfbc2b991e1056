"""OpenVINO INT8 through ``nncf.quantize``: the quantize stage's transformer preset, or nncf's defaults
for the benchmark's OpenVINO-default peer.
"""

from __future__ import annotations

from pathlib import Path


def quantize_openvino(source: Path, target: Path, feeds: list[dict], transformer: bool = True) -> None:
    import nncf
    import openvino as ov

    model = ov.Core().read_model(str(source))
    names = [i.get_any_name() for i in model.inputs]
    dataset = nncf.Dataset(feeds, lambda feed: {k: feed[k] for k in names})
    preset = {"model_type": nncf.ModelType.TRANSFORMER} if transformer else {}
    quantized = nncf.quantize(model, dataset, subset_size=len(feeds), **preset)
    ov.save_model(quantized, str(target), compress_to_fp16=False)
