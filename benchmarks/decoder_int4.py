"""Where a decoder's INT4 perplexity goes: ONNX Runtime INT4 variants of a `smollm2-int4` run's FP32 export, each
scored by perplexity on the first evaluation texts through the runtime's decoding loop, with its file size and
(``--speed``) its decode tokens/s beside the FP32 export's.

    python benchmarks/decoder_int4.py runs/smollm2-int4 --texts 100 --speed --out benchmarks/results/smollm2-int4/COMMIT

Variants: round to nearest (the quantize stage's ``algorithm: rtn``: symmetric, 32 weights per scale, every MatMul,
the LM head included; then the LM head in 8 bits, at 32 and 16 weights per scale, symmetric and asymmetric); the
quantize stage's ``algorithm: awq`` (NNCF's AWQ and scale estimation, asymmetric, calibrated on 64 training
reviews); and HQQ (ONNX Runtime's half-quadratic quantizer: data-free, float zero points). SmolLM2's FP32 reference
is itself dequantised from a GGUF file whose MatMuls are Q4_1 (blocks of 32 weights along the input, a scale and a
float minimum each): only a float zero point can land on that grid again.

Speed: greedy generation of NEW_TOKENS tokens after PROMPTS prompts of PROMPT_TOKENS tokens, each model in a fresh
process per round (its threads cannot slow the next), the order reversed in the second round; tokens/s is the
median over the prompts of both rounds.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HEAD = "/lm_head/MatMul"
SHARED = Path(__file__).resolve().parents[2] / "shared/datasets/amazon-reviews/electronics"
CALIBRATION_TEXTS = 64  # recipes/smollm2-int4.yaml's calibration_samples
PROMPTS, PROMPT_TOKENS, NEW_TOKENS = 4, 32, 64


def round_to_nearest(source: Path, target: Path, bits: int, group: int, symmetric: bool, head_bits: int) -> None:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from edgetl.quantization import MATMUL_NBITS_ACCURACY_LEVEL

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    body = MatMulNBitsQuantizer(onnx.load(str(source)), bits=bits, block_size=group, is_symmetric=symmetric,
                                accuracy_level=MATMUL_NBITS_ACCURACY_LEVEL,
                                nodes_to_exclude=[HEAD] if head_bits != bits else None)
    body.process()
    _head_in(body.model.model, head_bits, target) if head_bits != bits else \
        body.model.save_model_to_file(str(target), use_external_data_format=False)


def _head_in(model, bits: int, target: Path) -> None:
    """The one MatMul left in float (the LM head) in ``bits`` bits, symmetric, 32 weights per scale."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from edgetl.quantization import MATMUL_NBITS_ACCURACY_LEVEL

    head = MatMulNBitsQuantizer(model, bits=bits, block_size=32, is_symmetric=True,
                                accuracy_level=MATMUL_NBITS_ACCURACY_LEVEL)
    head.process()
    head.model.save_model_to_file(str(target), use_external_data_format=False)


def hqq(source: Path, target: Path, group: int) -> None:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    body = MatMulNBitsQuantizer(onnx.load(str(source)), algo_config=HQQWeightOnlyQuantConfig(block_size=group, bits=4),
                                nodes_to_exclude=[HEAD])
    body.process()
    _head_in(body.model.model, 8, target)


def calibrated(source: Path, target: Path, group: int, ids: list[list[int]]) -> None:
    from edgetl.quantization import compress_weights_onnx
    from edgetl.runtime.decoding import KVCacheDecoder
    from edgetl.runtime.engines import open_engine

    decoder = KVCacheDecoder(open_engine("onnx", source))
    compress_weights_onnx(source, target, 4, group, [decoder.feeds(i) for i in ids])


def perplexity(model: Path, ids: list[list[int]]) -> float:
    from edgetl.runtime.decoding import KVCacheDecoder
    from edgetl.runtime.engines import open_engine

    decoder = KVCacheDecoder(open_engine("onnx", model))
    nll = sum(decoder.negative_log_likelihood(i) for i in ids)
    return math.exp(nll / sum(len(i) - 1 for i in ids))


def decode_times(model: Path, prompts: list[list[int]]) -> list[float]:
    """Seconds per generated token for each prompt (greedy, NEW_TOKENS tokens), after one untimed generation."""
    from edgetl.bench.measure import timed_calls
    from edgetl.runtime.decoding import GenerationSettings, KVCacheDecoder
    from edgetl.runtime.engines import open_engine

    class Generation:  # no end tokens given: always NEW_TOKENS tokens
        def __init__(self):
            self.decoder = KVCacheDecoder(open_engine("onnx", model))
            self.settings = GenerationSettings(max_new_tokens=NEW_TOKENS)

        def run(self, ids: list[int]) -> None:
            for _ in self.decoder.tokens(ids, self.settings):
                pass

    return [t / NEW_TOKENS for t in timed_calls(Generation(), prompts, warmup=1)]


def speed(models: dict[str, Path], prompts: list[list[int]]) -> dict[str, float]:
    """Decode tokens/s per variant: a fresh process per model and round, two rounds in opposite orders."""
    seconds: dict[str, list[float]] = {name: [] for name in models}
    for order in (list(models), list(reversed(models))):
        for name in order:
            done = subprocess.run([sys.executable, __file__, "--time", str(models[name]), json.dumps(prompts)],
                                  capture_output=True, text=True, check=True)
            seconds[name] += json.loads(done.stdout.strip().splitlines()[-1])
    return {name: round(1 / statistics.median(s), 1) for name, s in seconds.items()}


def main() -> None:
    from tokenizers import Tokenizer

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--texts", type=int, default=100)
    parser.add_argument("--speed", action="store_true", help="also time decoding (alone on the machine)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    export = next(args.run_dir.glob("*-export")) / "onnx"
    tokenizer = Tokenizer.from_file(str(export / "tokenizer.json"))

    def token_ids(split: str, count: int) -> list[list[int]]:
        texts = [json.loads(line)["text"] for line in (SHARED / split).read_text().splitlines() if line.strip()]
        return [e.ids[:256] for e in tokenizer.encode_batch(texts[:count])]  # the recipe's max_length

    ids, calibration = token_ids("dev.jsonl", args.texts), token_ids("train.jsonl", CALIBRATION_TEXTS)
    fp32 = export / "model.onnx"
    rows = [{"variant": "FP32", "mb": round(fp32.stat().st_size / 1e6, 1), "perplexity": round(perplexity(fp32, ids), 3)}]
    variants = {
        "INT4 sym g32, LM head INT4 (algorithm: rtn)": lambda t: round_to_nearest(fp32, t, 4, 32, True, 4),
        "INT4 sym g32, LM head INT8": lambda t: round_to_nearest(fp32, t, 4, 32, True, 8),
        "INT4 asym g32, LM head INT8": lambda t: round_to_nearest(fp32, t, 4, 32, False, 8),
        "INT4 sym g16, LM head INT8": lambda t: round_to_nearest(fp32, t, 4, 16, True, 8),
        "INT4 HQQ g32 (float zero points), LM head INT8": lambda t: hqq(fp32, t, 32),
        "INT4 asym g32 AWQ + scale estimation, LM head INT8 (algorithm: awq)": lambda t: calibrated(fp32, t, 32, calibration),
        "INT8 sym g32 (algorithm: rtn)": lambda t: round_to_nearest(fp32, t, 8, 32, True, 8),
    }
    timed = {"FP32": fp32}
    with tempfile.TemporaryDirectory() as scratch:
        for index, (name, make) in enumerate(variants.items()):
            target = Path(scratch) / f"model{index}.onnx"
            make(target)
            rows.append({"variant": name, "mb": round(target.stat().st_size / 1e6, 1),
                         "perplexity": round(perplexity(target, ids), 3)})
            print(json.dumps(rows[-1]), flush=True)
            if "algorithm" in name or "HQQ" in name:
                timed[name] = target
        if args.speed:
            prompts = [i[:PROMPT_TOKENS] for i in ids if len(i) >= PROMPT_TOKENS][:PROMPTS]
            tokens_per_s = speed(timed, prompts)
            for row in rows:
                if row["variant"] in tokens_per_s:
                    row["decode_tokens_per_s"] = tokens_per_s[row["variant"]]
    for row in rows:
        row["perplexity_vs_fp32"] = round(row["perplexity"] / rows[0]["perplexity"] - 1, 4)
        row["size_vs_fp32"] = round(row["mb"] / rows[0]["mb"], 4)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decoder_int4.json").write_text(json.dumps(
        {"texts": len(ids), "calibration_texts": len(calibration),
         "speed": {"prompts": PROMPTS, "prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS, "rounds": 2}
         if args.speed else None, "rows": rows}, indent=1))


def time_main(model: str, prompts: str) -> None:
    print(json.dumps(decode_times(Path(model), json.loads(prompts))))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--time"]:
        time_main(*sys.argv[2:4])
    else:
        main()
