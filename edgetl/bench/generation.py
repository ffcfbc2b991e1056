"""A decoder's benchmark: time to first token and decode tokens/s at batch 1, per model artifact and backend.

Prompts of ``PROMPT_LENGTHS`` tokens are cut from the evaluation texts (joined where one is too short), and each is
continued by ``NEW_TOKENS`` greedy tokens with no end token, so every target generates the same number. ONNX Runtime
and OpenVINO run edgetl's runtime loop (``KVCacheDecoder``); PyTorch runs transformers' ``generate`` (eager, its
KV cache), as its users would. Two calls are timed by ``edgetl.bench.measure.timed_calls``: the prompt's forward and
first token (time to first token, TTFT), and the whole generation; decode tokens/s is the new tokens after the first
over the p50 difference of the two. Each target is timed in a fresh process per round (its peak resident memory read
there), the target order reversed every other round; a p50 whose rounds spread by more than ``bench.noise_threshold``
is flagged noisy.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from edgetl.artifact import Artifact
from edgetl.backends import Target, targets_of
from edgetl.bench.machine import machine_info
from edgetl.bench.measure import (RESULT_FORMAT, RESULT_VERSION, target_spec, in_fresh_process,
                                  latency_summary, timed_calls)
from edgetl.recipe import BenchConfig
from edgetl.tasks import Task

PROMPT_LENGTHS, NEW_TOKENS, PROMPTS = (32, 256), 128, 3


def prompts_of(folder: Path, texts: list[str], length: int, count: int) -> list[list[int]]:
    """``count`` prompts of exactly ``length`` token ids, cut in turn from the texts joined end to end."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    stream = [i for e in tokenizer.encode_batch(texts) for i in e.ids]
    if len(stream) < length * count:
        raise ValueError(f"the evaluation texts hold {len(stream)} tokens; {count} prompts of {length} need more")
    return [stream[k * length:(k + 1) * length] for k in range(count)]


class _Decoding:
    """``run(ids)``: the prompt's forward and its first token, or (``new_tokens`` > 1) the whole generation."""

    def __init__(self, target: Target, task: Task, new_tokens: int, threads: int | None):
        self.new_tokens = new_tokens
        engine = target.open(threads, task)
        if target.backend == "pytorch":  # transformers' own generate, as a PyTorch user runs it
            self._torch, self.model = engine._torch, engine.model
        else:
            from edgetl.runtime.decoding import GenerationSettings, KVCacheDecoder

            self.decoder, self.settings = KVCacheDecoder(engine), GenerationSettings(max_new_tokens=new_tokens)
            self.model = None

    def run(self, ids: list[int]) -> None:
        if self.model is None:
            produced = len(list(self.decoder.tokens(ids, self.settings)))
        else:
            with self._torch.inference_mode():
                out = self.model.generate(self._torch.tensor([ids]), attention_mask=self._torch.ones(1, len(ids), dtype=int),
                                          max_new_tokens=self.new_tokens, min_new_tokens=self.new_tokens,
                                          do_sample=False, pad_token_id=0)
            produced = out.shape[1] - len(ids)
        if produced != self.new_tokens:
            raise RuntimeError(f"generated {produced} tokens, not {self.new_tokens}")


def _peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM; Linux), or ru_maxrss elsewhere."""
    status = Path("/proc/self/status")
    for line in status.read_text().splitlines() if status.is_file() else []:
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _block(spec: dict) -> dict:
    """One target in this process: per prompt length, the TTFT and whole-generation times, and peak memory."""
    from edgetl.tasks import task_for

    task = task_for(spec["task"])
    target = Target(Artifact(Path(spec["path"]), spec["manifest"], label=spec["label"]), spec["backend"])
    first, whole = (_Decoding(target, task, n, spec["threads"]) for n in (1, spec["new_tokens"]))
    times = {}
    for length, prompts in spec["prompts"].items():
        times[length] = {"ttft": timed_calls(first, prompts, warmup=1), "generate": timed_calls(whole, prompts, warmup=1)}
    return {"times": times, "peak_rss_mb": round(_peak_rss_mb(), 1)}


def _block_in_subprocess(target: Target, prompts: dict, task: Task, new_tokens: int, threads: int | None) -> dict:
    spec = {**target_spec(target), "task": task.name, "prompts": prompts, "new_tokens": new_tokens, "threads": threads}
    return in_fresh_process("edgetl.bench.generation", spec, f"timing {target.key}")


def benchmark(artifacts: list[Artifact], texts: list, scores: dict[str, float], bench: BenchConfig, max_length: int,
              out_dir: Path, title: str = "", task: Task | None = None, new_tokens: int = NEW_TOKENS,
              prompt_lengths: tuple[int, ...] = PROMPT_LENGTHS, prompts: int = PROMPTS) -> dict:
    """Every target of ``artifacts`` timed on prompts cut from ``texts``; the stage's results.json and reports."""
    from tqdm import tqdm

    targets = targets_of(artifacts, include_pytorch=bench.include_pytorch)
    folder = next(t.folder for t in targets)
    feeds = {str(n): prompts_of(folder, texts, n, prompts) for n in prompt_lengths}
    blocks: dict[str, list[dict]] = {t.key: [] for t in targets}
    for round_index in tqdm(range(bench.rounds), desc="benchmark rounds (a process per target)"):
        order = targets if round_index % 2 == 0 else targets[::-1]
        for target in order:
            blocks[target.key].append(_block_in_subprocess(target, feeds, task, new_tokens, bench.threads))
    rows = [_row(t, blocks[t.key], scores.get(t.key), task, new_tokens, bench.noise_threshold) for t in targets]
    reference = next((r for r in rows if r["backend"] == "pytorch"), None)
    for row in rows:
        if reference:
            row["decode_speedup"] = round(row["decode_tokens_per_s"] / reference["decode_tokens_per_s"], 3)
    machine = machine_info()
    result = {
        "format": RESULT_FORMAT, "format_version": RESULT_VERSION, "title": title,
        "label": f"{title} benchmark stage: {machine['cpu']}, {machine['usable_cores']} cores",
        "task": task.name, "metric": {"name": task.metric, "scale": task.metric_scale}, "machine": machine,
        "settings": {"prompt_lengths": list(prompt_lengths), "prompts": prompts, "new_tokens": new_tokens,
                     "rounds": bench.rounds, "noise_threshold": bench.noise_threshold, "batch": 1,
                     "threads": bench.threads},
        "notes": [], "rows": rows,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(result, indent=1))
    (out_dir / "report.md").write_text(markdown(result))
    return result


def markdown(result: dict) -> str:
    """report.md of a decoder benchmark: the settings, then ``markdown_table``."""
    from edgetl.bench.machine import describe

    settings, lengths = result["settings"], result["settings"]["prompt_lengths"]
    return "\n".join([
        f"# Benchmark: {result['title']}", "", f"Machine: {describe(result['machine'])}",
        f"Batch 1; prompts of {' and '.join(map(str, lengths))} tokens ({settings['prompts']} each), "
        f"{settings['new_tokens']} greedy new tokens; threads: {settings.get('threads') or 'default'}; "
        f"{settings['rounds']} rounds, a fresh process per target, order alternating. Decode speed-up: this target's decode tokens/s over PyTorch FP32 eager's "
        f"({lengths[0]}-token prompts), same run. noisy: per-round values spread by more than "
        f"{settings['noise_threshold']:.0%}.", "", markdown_table(result), ""])


def markdown_table(result: dict) -> str:
    """One row per target: the task metric, time to first token and decode tokens/s per prompt length, size,
    peak memory and decode speed-up."""
    from edgetl.backends import BACKEND_LABELS

    metric, lengths = result["metric"]["name"], result["settings"]["prompt_lengths"]
    headers = ["model", "backend", "precision", metric, *(f"TTFT ms ({n})" for n in lengths),
               *(f"decode tok/s ({n})" for n in lengths), "size MB", "peak RSS MB", "decode speed-up", "flag"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * 3 + "---:|" * (len(headers) - 4) + "---|"]
    for r in result["rows"]:
        cells = [r["artifact"], BACKEND_LABELS.get(r["backend"], r["backend"]), r["precision"].upper(),
                 "–" if r.get(metric) is None else f"{r[metric]:.3f}",
                 *(f"{r[f'ttft_ms_{n}']:.1f}" for n in lengths), *(f"{r[f'decode_tokens_per_s_{n}']:.1f}" for n in lengths),
                 f"{r['model_mb']:.1f}", f"{r['peak_rss_mb']:.0f}",
                 "–" if r.get("decode_speedup") is None else f"{r['decode_speedup']:.2f}x", "noisy" if r["noisy"] else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def is_generation_result(result: dict) -> bool:
    return "prompt_lengths" in result.get("settings", {})


def _row(target: Target, blocks: list[dict], score, task: Task, new_tokens: int, noise_threshold: float) -> dict:
    row = {"target": target.key, "artifact": target.artifact.name, "backend": target.backend,
           "precision": target.precision, task.metric: score, "model_mb": round(target.model_bytes / 1e6, 2),
           "peak_rss_mb": max(b["peak_rss_mb"] for b in blocks), "batch": 1, "seq": "own"}
    noisy = False
    for length in blocks[0]["times"]:
        ttft = [float(np.median(b["times"][length]["ttft"])) for b in blocks]
        whole = [float(np.median(b["times"][length]["generate"])) for b in blocks]
        decode = [(new_tokens - 1) / (w - t) for w, t in zip(whole, ttft, strict=True)]
        row[f"ttft_ms_{length}"] = latency_summary(sum((b["times"][length]["ttft"] for b in blocks), []))["p50_ms"]
        row[f"decode_tokens_per_s_{length}"] = round(float(np.median(decode)), 2)
        noisy |= any((max(v) - min(v)) / float(np.median(v)) > noise_threshold for v in (ttft, decode))
    first = next(iter(blocks[0]["times"]))
    # The columns every benchmark row has: p50_ms is one decode step, throughput its tokens per second.
    row["decode_tokens_per_s"] = row[f"decode_tokens_per_s_{first}"]
    row["p50_ms"] = round(1e3 / row["decode_tokens_per_s"], 4)
    row["throughput_per_s"] = row["decode_tokens_per_s"]
    row["noisy"] = noisy
    return row


if __name__ == "__main__":  # one target's block: python -m edgetl.bench.generation SPEC.json OUT.json
    Path(sys.argv[2]).write_text(json.dumps(_block(json.loads(Path(sys.argv[1]).read_text()))))
