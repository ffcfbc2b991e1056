"""Decoders end to end on tiny Llama and GPT-2 models: KV-cache export, weight-only INT8/INT4, evaluation through the
runtime's decoding loop, the torch-free Generator (greedy equal to transformers' generate, sampling, stop strings,
streaming, limits) and `edgetl generate`; one slow test on the real SmolLM2 checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import SHARED_ELECTRONICS, edgetl_cli, electronics_texts, tiny_decoder
from edgetl.errors import UsageError

RECIPE = {
    "name": "tiny-generation", "task": "text-generation",
    "data": {"dataset": "amazon-electronics", "max_length": 64},
    "stages": [{"stage": "pretrained"}, {"stage": "export", "formats": ["onnx", "openvino"]},
               {"stage": "quantize", "method": "weights", "bits": 8},
               {"stage": "quantize", "method": "weights", "bits": 4, "group_size": 16},
               {"stage": "evaluate"}, {"stage": "bundle", "max_new_tokens": 40}],
}


@pytest.fixture(scope="session", params=["llama", "gpt2"])
def decoder_run(request, tmp_path_factory, electronics_slice, quiet_cwd) -> tuple[Path, Path]:
    """(the tiny decoder's folder, its run of RECIPE) for each architecture."""
    from edgetl.pipeline import run_recipe
    from edgetl.recipe import Recipe

    model = tiny_decoder(tmp_path_factory.mktemp(f"tiny-{request.param}"), request.param,
                         electronics_texts(electronics_slice))
    recipe = Recipe.model_validate({**RECIPE, "model": str(model),
                                    "data": {**RECIPE["data"], "path": str(electronics_slice)}})
    run_dir = tmp_path_factory.mktemp(f"generation-{request.param}")
    run_recipe(recipe, run_dir)
    return model, run_dir


def _rows(run_dir: Path) -> dict[str, dict]:
    return {r["target"]: r for r in json.loads((run_dir / "05-evaluate" / "evaluation.json").read_text())}


def test_every_artifact_is_scored_through_the_same_loop_and_fp32_agrees(decoder_run):
    rows = _rows(decoder_run[1])
    assert set(rows) == {f"{b}-{p} ({s})" for b, p, s in [("pytorch", "fp32", "01-pretrained"),
                                                          ("onnx", "fp32", "02-export"), ("openvino", "fp32", "02-export"),
                                                          ("onnx", "int8", "03-quantize"), ("openvino", "int8", "03-quantize"),
                                                          ("onnx", "int4", "04-quantize"), ("openvino", "int4", "04-quantize")]}
    reference = rows["pytorch-fp32 (01-pretrained)"]
    assert reference["greedy_prompts"] > 10 and reference["tokens"] > 1000
    for key in ("onnx-fp32 (02-export)", "openvino-fp32 (02-export)"):  # the export computes the same model
        assert rows[key]["perplexity"] == pytest.approx(reference["perplexity"], rel=1e-4)
        assert rows[key]["greedy_exact"] == 1.0
    for row in rows.values():
        assert np.isfinite(row["perplexity"]) and 0 <= row["greedy_prefix"] <= 1


def test_weight_only_int4_is_smaller_and_records_its_groups(decoder_run):
    quantized = json.loads((decoder_run[1] / "04-quantize" / "manifest.json").read_text())
    export = json.loads((decoder_run[1] / "02-export" / "manifest.json").read_text())
    onnx = quantized["models"]["onnx"]
    assert (onnx["precision"], onnx["bits"], onnx["group_size"]) == ("int4", 4, 16)
    assert quantized["metrics"]["onnx_bytes"] < export["metrics"]["onnx_bytes"]
    assert quantized["metrics"]["openvino_bytes"] < export["metrics"]["openvino_bytes"]
    import onnx as onnx_lib

    graph = onnx_lib.load(str(decoder_run[1] / "04-quantize" / onnx["path"]), load_external_data=False).graph
    assert any(node.op_type == "MatMulNBits" for node in graph.node)


def test_calibrated_int4_runs_in_onnxruntime_as_close_to_fp32_as_rounding(decoder_run, tmp_path):
    """algorithm awq: NNCF's INT4 with its zero points repacked for ONNX Runtime and the LM head in 8 bits. Its
    logits stay as close to the FP32 export's as round-to-nearest INT4's do: zero points read in the wrong order
    would move every group by several levels."""
    import onnx

    from edgetl.quantization import compress_weights_onnx
    from edgetl.runtime.decoding import KVCacheDecoder
    from edgetl.runtime.engines import open_engine
    from edgetl.runtime.text import load_tokenizer

    fp32 = decoder_run[1] / "02-export" / "onnx" / "model.onnx"
    decoder = KVCacheDecoder(open_engine("onnx", fp32))
    cuts = load_tokenizer(fp32.parent, 64).encode_batch(electronics_texts(Path(_data_path(decoder_run[1])))[:24])
    feeds = [decoder.feeds(cut.ids) for cut in cuts]
    settings = compress_weights_onnx(fp32, tmp_path / "awq.onnx", 4, 16, feeds[:16])
    compress_weights_onnx(fp32, tmp_path / "rtn.onnx", 4, 16)
    assert settings | {"awq": True, "scale_estimation": True, "symmetric": False, "calibration_texts": 16} == settings
    nodes = [n for n in onnx.load(str(tmp_path / "awq.onnx")).graph.node if n.op_type == "MatMulNBits"]
    bits = sorted(next(a.i for a in n.attribute if a.name == "bits") for n in nodes)
    assert bits[-1] == 8 and bits.count(8) == 1 and bits[0] == 4  # the LM head alone in 8 bits
    assert all(next(a.i for a in n.attribute if a.name == "accuracy_level") == 4 for n in nodes)

    def error(model: Path) -> float:
        quantized = KVCacheDecoder(open_engine("onnx", model))
        return float(np.mean([np.abs(quantized.forward(c.ids, quantized.empty_cache())[0]
                                     - decoder.forward(c.ids, decoder.empty_cache())[0]).mean() for c in cuts[16:]]))

    assert 0 < error(tmp_path / "awq.onnx") < 1.5 * error(tmp_path / "rtn.onnx")


@pytest.fixture(scope="session")
def fp32_bundle(decoder_run, tmp_path_factory) -> Path:
    """The run's bundle stage rerun over the FP32 export, so its generations can equal transformers'."""
    from edgetl.pipeline import run_recipe
    from edgetl.recipe import Recipe

    model, run_dir = decoder_run
    stages = [s for s in RECIPE["stages"] if s["stage"] in ("pretrained", "export", "bundle")]
    recipe = Recipe.model_validate({**RECIPE, "stages": stages, "model": str(model),
                                    "data": {**RECIPE["data"], "path": str(Path(_data_path(run_dir)))}})
    fp32_dir = tmp_path_factory.mktemp("generation-fp32")
    run_recipe(recipe, fp32_dir)
    return fp32_dir / "03-bundle"


def _data_path(run_dir: Path) -> str:
    import yaml

    return yaml.safe_load((run_dir / "recipe.resolved.yaml").read_text())["data"]["path"]


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_greedy_generation_equals_transformers_token_for_token(decoder_run, fp32_bundle, backend):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgetl.runtime import Generator, load

    model_dir, run_dir = decoder_run
    model, tokenizer = AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)
    generator = load(fp32_bundle, backend=backend)
    assert isinstance(generator, Generator)
    prompts = [text[:20 + 3 * i] for i, text in enumerate(electronics_texts(Path(_data_path(run_dir)))[:20])]
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            expected = model.generate(**ids, max_new_tokens=16, do_sample=False, pad_token_id=0,
                                      eos_token_id=None)[0, ids["input_ids"].shape[1]:].tolist()
        got = generator.generate(prompt, max_new_tokens=16)
        # An end token stops the runtime (transformers was told to go on): compare up to there.
        assert got.token_ids == expected[:len(got.token_ids)], prompt
        assert len(got.token_ids) == 16 or expected[len(got.token_ids)] in generator.eos_ids


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_a_sharded_decoder_generates_as_the_whole_one(fp32_bundle, tmp_path, backend):
    """Each part holds its layers' KV cache: the cache tensors go in and out with the part that owns them."""
    import numpy as np

    from edgetl.runtime import load
    from edgetl.runtime.pipeline import PipelineEngine
    from edgetl.sharding import shard_bundle

    fmt = {"onnxruntime": "onnx", "openvino": "openvino"}[backend]
    shard_bundle(fp32_bundle, tmp_path / "sharded", 2, backends=[fmt], log=lambda _: None)
    whole, sharded = load(fp32_bundle, backend=backend), load(tmp_path / "sharded", backend=backend)
    assert isinstance(sharded.engine, PipelineEngine) and len(sharded.engine.parts) == 2
    ids = whole.tokenizer.encode("A cable that works").ids
    steps = []
    for model in (whole, sharded):
        logits, cache = model.decoder.forward(ids, model.decoder.empty_cache())
        steps.append(model.decoder.forward([int(logits[-1].argmax())], cache)[0])  # one token after the prompt
    np.testing.assert_allclose(steps[1], steps[0], atol=1e-4)
    for prompt in ("A cable", "The battery lasted", "I bought this for my"):
        assert sharded.generate(prompt, max_new_tokens=12).token_ids == whole.generate(prompt, max_new_tokens=12).token_ids


def test_streaming_sampling_stop_strings_and_limits(fp32_bundle):
    from edgetl.runtime import GenerationSettings, load

    generator = load(fp32_bundle, backend="onnxruntime")
    prompt = "This charger works"
    whole = generator.generate(prompt, max_new_tokens=24)
    assert "".join(generator.stream(prompt, max_new_tokens=24)) == whole.text
    # Sampling: the same seed gives the same text; top_k=1 is greedy.
    sampled = [generator.generate(prompt, max_new_tokens=24, temperature=1.0, top_p=0.9, seed=7) for _ in range(2)]
    assert sampled[0] == sampled[1]
    assert generator.generate(prompt, max_new_tokens=24, temperature=0.7, top_k=1, seed=3).token_ids == whole.token_ids
    # A stop string taken from the greedy text ends it just before, and is never streamed.
    stop = whole.text[len(whole.text) // 2:][:3]
    assert stop.strip(), whole.text
    stopped = generator.generate(prompt, GenerationSettings(max_new_tokens=24, stop=(stop,)))
    assert stopped.text == whole.text[:whole.text.find(stop)] and stopped.finish_reason == "stop"
    assert "".join(generator.stream(prompt, GenerationSettings(max_new_tokens=24, stop=(stop,)))) == stopped.text
    with pytest.raises(UsageError, match="prompt is empty"):
        generator.generate("")
    with pytest.raises(UsageError, match="at most 64"):
        generator.generate("word " * 200)
    with pytest.raises(UsageError, match="at most 40"):
        generator.generate(prompt, max_new_tokens=41)
    with pytest.raises(UsageError, match="top_p"):
        GenerationSettings(top_p=0)


def test_the_generation_runtime_and_cli_import_no_torch(fp32_bundle, tmp_path):
    code = ("import sys, edgetl.runtime as rt; g = rt.load(sys.argv[1]); g.generate('A cable', max_new_tokens=4); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    done = subprocess.run([sys.executable, "-c", code, str(fp32_bundle)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    done = edgetl_cli("generate", str(fp32_bundle), "A cable", "--max-new-tokens", "5", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip()
    done = edgetl_cli("generate", str(fp32_bundle), "A cable", "--max-new-tokens", "500", cwd=tmp_path)
    assert done.returncode != 0 and "at most 40" in done.stderr


def test_a_decoder_task_refuses_what_it_cannot_do(tmp_path, tiny_llama):
    import yaml

    from edgetl.architectures import adapter_for
    from edgetl.errors import ArchitectureError, RecipeError
    from edgetl.recipe import load_recipe

    path = tmp_path / "bad.yaml"
    stages = [{"stage": "pretrained"}, {"stage": "export"}, {"stage": "quantize"}, {"stage": "distill"}]
    path.write_text(yaml.safe_dump({**RECIPE, "model": str(tiny_llama), "stages": stages}))
    with pytest.raises(RecipeError) as refused:
        load_recipe(str(path))
    assert "(quantize).method: task text-generation does not support ptq" in str(refused.value)
    assert "does not support the distill stage" in str(refused.value)
    calibrated_int8 = {"stage": "quantize", "method": "weights", "bits": 8, "algorithm": "awq"}
    path.write_text(yaml.safe_dump({**RECIPE, "model": str(tiny_llama), "stages": [*stages[:2], calibrated_int8]}))
    with pytest.raises(RecipeError, match=r"stages\[2\] \(quantize\): algorithm awq calibrates weight-only INT4"):
        load_recipe(str(path))

    with pytest.raises(ArchitectureError, match="weight-only"):
        adapter_for("llama").require("head_pruning")


def test_a_bundle_whose_prompts_and_new_tokens_overrun_the_positions_is_refused(tiny_llama, electronics_slice,
                                                                               tmp_path, quiet_cwd):
    from edgetl.errors import StageError
    from edgetl.pipeline import run_recipe
    from edgetl.recipe import Recipe

    stages = [{"stage": "pretrained"}, {"stage": "export", "formats": ["onnx"]},
              {"stage": "bundle", "backends": ["onnx"], "max_new_tokens": 500}]
    recipe = Recipe.model_validate({**RECIPE, "stages": stages, "model": str(tiny_llama),
                                    "data": {**RECIPE["data"], "path": str(electronics_slice)}})
    with pytest.raises(StageError, match="overruns the model's 512 positions"):
        run_recipe(recipe, tmp_path / "run")


@pytest.mark.slow
def test_smollm2_from_its_gguf_generates_as_transformers_does(tmp_path, quiet_cwd):
    """The catalog's SmolLM2-135M (dequantised from its Q4_1 GGUF file), exported with its KV cache: the runtime's
    greedy text equals transformers' on 20 prompts."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgetl.modeling import model_folder
    from edgetl.runtime.engines import open_engine
    from edgetl.runtime.decoding import GenerationSettings, KVCacheDecoder
    from edgetl.stages.export import export_onnx
    from edgetl.tasks import TASKS

    source = model_folder("smollm2-135m")  # the GGUF file dequantised into the cache (once per installed file)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(source).eval(), AutoTokenizer.from_pretrained(source)
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    export_onnx(model, tmp_path, 17, atol=TASKS["text-generation"].export_atol, task="text-generation-with-past")
    decoder = KVCacheDecoder(open_engine("onnx", tmp_path / "model.onnx"))
    texts = [json.loads(line)["text"] for line in (SHARED_ELECTRONICS / "dev.jsonl").read_text().splitlines()[:20]]
    for text in texts:
        ids = tokenizer(text[:120])["input_ids"]
        with torch.no_grad():
            expected = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                      max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert list(decoder.tokens(ids, GenerationSettings(max_new_tokens=20))) == expected[0, len(ids):].tolist()


# --- POST /generate -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def generation_server(fp32_bundle):
    from conftest import REPO

    sys.path.insert(0, str(REPO / "benchmarks"))
    from serve_load import start_server, stop_server

    process, port = start_server(fp32_bundle, "--backend", "onnxruntime")
    yield port
    stop_server(process)


def _post(port: int, body, stream: bool = False):
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    data = json.dumps(body).encode() if isinstance(body, dict) else body.encode()
    conn.request("POST", "/generate", body=data, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    raw = response.read().decode()
    conn.close()
    lines = [json.loads(line) for line in raw.splitlines()] if stream and response.status == 200 else json.loads(raw)
    return response.status, response.getheader("Content-Type"), lines


def test_generate_answers_whole_and_streamed_as_the_library_does(generation_server, fp32_bundle):
    from edgetl.runtime import load

    expected = load(fp32_bundle, backend="onnxruntime").generate("This charger works", max_new_tokens=12)
    status, _, body = _post(generation_server, {"prompt": "This charger works", "max_new_tokens": 12})
    assert status == 200 and body == {"text": expected.text, "tokens": len(expected.token_ids),
                                      "finish_reason": expected.finish_reason}
    status, kind, lines = _post(generation_server, {"prompt": "This charger works", "max_new_tokens": 12,
                                                    "stream": True}, stream=True)
    assert status == 200 and kind.startswith("application/x-ndjson") and len(lines) > 2
    assert "".join(line["text"] for line in lines[:-1]) == expected.text
    assert lines[-1] == {"done": True, "tokens": len(expected.token_ids), "finish_reason": expected.finish_reason}


@pytest.mark.parametrize("body, message", [
    ({"text": "a"}, 'expected a JSON object with "prompt": string'),
    ({"prompt": 5}, 'expected a JSON object with "prompt": string'),
    ({"prompt": "a", "max_new_tokens": "9"}, '"max_new_tokens" must be int, not str'),
    ({"prompt": "a", "max_new_tokens": True}, '"max_new_tokens" must be int, not bool'),
    ({"prompt": "a", "temperature": -1}, "temperature=-1 is out of range"),
    ({"prompt": "a", "stop": "x"}, '"stop" must be list, not str'),
    ({"prompt": "a", "stop": [3]}, "stop must be a list of non-empty strings"),
    ({"prompt": "a", "stream": "yes"}, '"stream" must be true or false'),
    ({"prompt": "a", "beams": 4}, "unknown field(s) ['beams']"),
    ({"prompt": "a", "max_new_tokens": 41}, "generates at most 40"),
    ({"prompt": "word " * 200}, "takes at most 64"),
    ({"prompt": ""}, "prompt is empty"),
])
def test_bad_generate_requests_get_422_and_the_service_keeps_serving(generation_server, body, message):
    status, _, answer = _post(generation_server, body)
    assert status == 422 and message in answer["error"], answer
    assert _post(generation_server, {"prompt": "still here", "max_new_tokens": 2})[0] == 200
