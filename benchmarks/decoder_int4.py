"""Where a decoder's INT4 perplexity goes: ONNX Runtime INT4 variants of a `smollm2-int4` run's FP32 export, each
scored by perplexity on the first evaluation texts through the runtime's decoding loop, with its file size.

    python benchmarks/decoder_int4.py runs/smollm2-int4 --texts 100 --out benchmarks/results/smollm2-int4/COMMIT

Variants: the quantize stage's (symmetric, 32 weights per scale, every MatMul, the LM head included), and the
same with the LM head (the tied embedding's transpose, the largest matrix) in 8 bits, at 32 and 16 weights per
scale, symmetric and asymmetric. Round to nearest throughout (no calibration data).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import tempfile
from pathlib import Path

HEAD = "/lm_head/MatMul"


def quantize(source: Path, target: Path, bits: int, group: int, symmetric: bool, head_bits: int) -> None:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from edgetl.quantization import MATMUL_NBITS_ACCURACY_LEVEL

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    body = MatMulNBitsQuantizer(onnx.load(str(source)), bits=bits, block_size=group, is_symmetric=symmetric,
                                accuracy_level=MATMUL_NBITS_ACCURACY_LEVEL,
                                nodes_to_exclude=[HEAD] if head_bits != bits else None)
    body.process()
    model = body.model
    if head_bits != bits:  # the one MatMul left in float
        head = MatMulNBitsQuantizer(model.model, bits=head_bits, block_size=32, is_symmetric=True,
                                    accuracy_level=MATMUL_NBITS_ACCURACY_LEVEL)
        head.process()
        model = head.model
    model.save_model_to_file(str(target), use_external_data_format=False)


def perplexity(model: Path, ids: list[list[int]]) -> float:
    from edgetl.runtime.decoding import KVCacheDecoder
    from edgetl.runtime.engines import open_engine

    decoder = KVCacheDecoder(open_engine("onnx", model))
    nll = sum(decoder.negative_log_likelihood(i) for i in ids)
    return math.exp(nll / sum(len(i) - 1 for i in ids))


def main() -> None:
    from tokenizers import Tokenizer

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--texts", type=int, default=100)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    export = next(args.run_dir.glob("*-export")) / "onnx"
    texts = [json.loads(line)["text"] for line in
             (Path(__file__).resolve().parents[2] / "shared/datasets/amazon-reviews/electronics/dev.jsonl")
             .read_text().splitlines() if line.strip()][: args.texts]
    tokenizer = Tokenizer.from_file(str(export / "tokenizer.json"))
    ids = [e.ids[:256] for e in tokenizer.encode_batch(texts)]  # the recipe's max_length
    fp32 = export / "model.onnx"
    rows = [{"variant": "FP32", "mb": round(fp32.stat().st_size / 1e6, 1), "perplexity": round(perplexity(fp32, ids), 3)}]
    variants = [("INT4 sym g32, LM head INT4 (the quantize stage)", 4, 32, True, 4),
                ("INT4 sym g32, LM head INT8", 4, 32, True, 8), ("INT4 asym g32, LM head INT8", 4, 32, False, 8),
                ("INT4 sym g16, LM head INT8", 4, 16, True, 8), ("INT8 sym g32 (the quantize stage)", 8, 32, True, 8)]
    with tempfile.TemporaryDirectory() as scratch:
        for name, bits, group, symmetric, head_bits in variants:
            target = Path(scratch) / "model.onnx"
            quantize(fp32, target, bits, group, symmetric, head_bits)
            rows.append({"variant": name, "mb": round(target.stat().st_size / 1e6, 1),
                         "perplexity": round(perplexity(target, ids), 3)})
            print(json.dumps(rows[-1]), flush=True)
    for row in rows:
        row["perplexity_vs_fp32"] = round(row["perplexity"] / rows[0]["perplexity"] - 1, 4)
        row["size_vs_fp32"] = round(row["mb"] / rows[0]["mb"], 4)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decoder_int4.json").write_text(json.dumps({"texts": len(ids), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
