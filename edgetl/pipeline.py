"""Run a recipe's stages in order, each into ``<run_dir>/<NN>-<stage>/``, skipping finished ones.

A stage writes into ``<run_dir>/.tmp/<NN>-<stage>/`` and the folder is renamed into place only after its
manifest is written, so a killed run never leaves a half-written artifact that looks finished. A stage
whose fingerprint (its config, the recipe parts it reads, its inputs' fingerprints, edgetl's version)
matches a finished artifact is skipped: rerunning the same command resumes after the last finished stage.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from edgetl import __version__
from edgetl.artifact import MODEL_KINDS, Artifact, file_table, write_manifest
from edgetl.errors import RecipeError
from edgetl.recipe import STAGE_CLASSES, STAGE_NAMES, Recipe, resolved_dict

log = logging.getLogger("edgetl")

# Stage name -> module; imported only when the stage runs, so validation stays light.
STAGES = {name: f"edgetl.stages.{name}" for name in STAGE_NAMES}
HEARTBEAT_S = 60  # how often a log with no terminal behind it (CI) hears that a stage is still running


@dataclass
class StageContext:
    recipe: Recipe
    inputs: list[Artifact]
    run_dir: Path
    work_dir: Path  # survives a crash: checkpoints for resuming live here
    rank: int = 0
    world_size: int = 1

    def latest(self, *kinds: str) -> Artifact | None:
        matches = [a for a in self.inputs if a.kind in kinds]
        return matches[-1] if matches else None

    def earliest(self, kind: str) -> Artifact | None:
        return next((a for a in self.inputs if a.kind == kind), None)


def _rank() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _barrier(world_size: int) -> None:
    if world_size > 1:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()


def select_inputs(stage_cfg, done: list[Artifact], compared: list[Artifact] = ()) -> list[Artifact]:
    """The earlier artifacts a stage reads, as its config declares them (``Declared.takes``); ``compared``: other
    runs' artifacts named in ``bench.compare``."""
    picked: list[Artifact] = []
    for slot in stage_cfg.inputs():
        if slot == "models":
            picked += [a for a in done if a.kind in MODEL_KINDS]
        elif slot == "compared":
            picked += list(compared)
        elif slot.startswith("first:"):
            picked += [next((a for a in done if a.kind == slot.removeprefix("first:")), None)]
        else:
            latest = (next((a for a in reversed(done) if a.kind == kind), None) for kind in slot.split("|"))
            picked += [next((a for a in latest if a is not None), None)]
    return [a for a in picked if a is not None]


def resolve_compare(recipe: Recipe, run_dir: Path) -> list[Artifact]:
    """The finished artifacts that ``bench.compare`` names; refuses before any stage runs if one is missing."""
    found, problems = [], []
    for entry in recipe.bench.compare:
        other, sep, stage = entry.partition(":")
        if sep:
            folders = sorted((run_dir.parent / other).glob(f"[0-9][0-9]-{stage}"))
            hint = f"run `edgetl run {other}` first (into {run_dir.parent / other})"
        else:
            folders, hint = [Path(entry).expanduser()], "give a finished artifact folder"
        try:
            artifact = Artifact.load(folders[-1]) if folders else None
            if artifact is not None:
                artifact.verify()
        except Exception as exc:
            problems.append(f"bench.compare '{entry}': {exc}")
            continue
        if artifact is None:
            problems.append(f"bench.compare '{entry}': no finished {stage} artifact; {hint}")
            continue
        if artifact.kind not in (*MODEL_KINDS, "bundle"):
            problems.append(f"bench.compare '{entry}': {artifact.path} holds no model (kind {artifact.kind})")
            continue
        artifact.label = f"{artifact.path.parent.name}/{artifact.path.name}"
        found.append(artifact)
    if problems:
        raise RecipeError(recipe.name, problems)
    return found


def check_data(recipe: Recipe) -> None:
    """Read and check every labelled row before the run folder exists: bad data (a missing column, an empty
    split, a label not in data.labels, ...) fails with its file, row and column, and leaves nothing behind."""
    from edgetl.data import load_labelled
    from edgetl.tasks import task_for

    load_labelled(recipe.data, task_for(recipe.task))


def _data_reads(recipe: Recipe) -> dict:
    """The data config plus the content of the local files it names, so editing a file in place reruns.

    Of the column fields, only those the task reads count (a text-classification recipe's fingerprints do not
    change with ``tags_field``, nor did they when the fields of other tasks were added), and the task itself
    counts where it is not the default one, for the same reason.
    """
    from edgetl.artifact import sha256_file
    from edgetl.data import local_files
    from edgetl.tasks import COLUMN_FIELDS, DEFAULT_TASK, task_for

    files = {f.name: sha256_file(f) for f in local_files(recipe.data) if f.is_file()}
    unread = set(COLUMN_FIELDS) - set(task_for(recipe.task).read_columns(recipe.data))
    reads = {"config": recipe.data.model_dump(mode="json", exclude=unread), "files": files}
    return reads | ({"task": recipe.task} if recipe.task != DEFAULT_TASK else {})


def fingerprint(stage_cfg: dict, recipe: Recipe, inputs: list[Artifact], data_reads: dict | None = None) -> str:
    """``data_reads`` (from ``_data_reads``) can be passed in so a run hashes its data files once."""
    reads = {"stage": stage_cfg, "inputs": [a.fingerprint for a in inputs], "edgetl": __version__}
    declared = STAGE_CLASSES[stage_cfg["stage"]].reads
    if "model" in declared:
        reads["model"] = recipe.model
    if stage_cfg.get("teacher"):
        folder = Path(stage_cfg["teacher"]).expanduser()
        reads["teacher"] = file_table(folder) if folder.is_dir() else None  # a missing folder fails in the stage
    if "data" in declared:
        reads["data"] = data_reads if data_reads is not None else _data_reads(recipe)
    if "bench" in declared:
        reads["bench"] = recipe.bench.model_dump(mode="json")
    blob = json.dumps(reads, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


def _reuse_from_sibling_run(run_dir: Path, name: str, fp: str) -> None:
    """A finished artifact with this fingerprint in another run beside this one (e.g. sst-int8's teacher).

    The fingerprint covers the stage config, the data and the inputs' fingerprints, so a match is the same
    work; it is copied (not linked), so each run folder stands alone.
    """
    stage = name.split("-", 1)[1]
    for folder in sorted(run_dir.parent.glob(f"*/[0-9][0-9]-{stage}")):
        if folder.parent == run_dir:
            continue
        artifact = _finished(folder, fp, quiet=True)
        if artifact is not None:
            tmp = run_dir / ".tmp" / name
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(folder, tmp)
            _publish(tmp, run_dir / name)
            log.info("%s: same work as %s, copied (fingerprint %s)", name, folder, fp[:12])
            return


def _finished(folder: Path, fp: str, quiet: bool = False) -> Artifact | None:
    """The finished artifact in ``folder`` if it has this fingerprint and its files match their sha256."""
    try:
        artifact = Artifact.load(folder)
        if artifact.manifest.get("fingerprint") != fp:
            return None
        artifact.verify()
    except Exception as exc:
        if folder.exists() and not quiet:
            log.warning("%s: not reusable (%s); running the stage again", folder.name, exc)
        return None
    return artifact


def _publish(tmp: Path, final: Path) -> None:
    """Move a finished temp folder into place, replacing a stale artifact of the same stage."""
    if final.exists():
        stale = final.with_name(f".stale-{final.name}-{os.getpid()}")
        os.replace(final, stale)
        os.replace(tmp, final)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.replace(tmp, final)


def run_recipe(recipe: Recipe, run_dir: Path | None = None, from_stage: str | None = None,
               seed: list[Artifact] = ()) -> list[Artifact]:
    """Run every stage of ``recipe``; returns the artifacts in stage order.

    ``seed``: finished artifacts the first stages read as if earlier stages had made them (the search's
    untrained shapes); they come first in the returned list.
    """
    run_dir = Path(run_dir or Path("runs") / recipe.name)
    names = [s.stage for s in recipe.stages]
    if from_stage is not None and from_stage not in names:
        raise RecipeError("--from", [f"'{from_stage}' is not a stage of {recipe.name} (stages: {', '.join(names)})"])
    rank, world_size = _rank()
    if world_size > 1:
        from accelerate import PartialState

        PartialState()  # joins the process group (gloo on CPU, nccl on GPUs) before any stage
    check_data(recipe)
    run_dir.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        (run_dir / "recipe.resolved.yaml").write_text(yaml.safe_dump(resolved_dict(recipe), sort_keys=False))
    forced = False
    data_reads = _data_reads(recipe)
    compared = resolve_compare(recipe, run_dir)
    done: list[Artifact] = list(seed)
    for index, stage_cfg in enumerate(recipe.stages):
        name = f"{index + 1:02d}-{stage_cfg.stage}"
        forced = forced or stage_cfg.stage == from_stage
        inputs = select_inputs(stage_cfg, done, compared)
        cfg_dict = stage_cfg.model_dump(mode="json")
        fp = fingerprint(cfg_dict, recipe, inputs, data_reads)
        final = run_dir / name
        cached = None if forced else _finished(final, fp)
        if cached is None and not forced:
            if rank == 0:
                _reuse_from_sibling_run(run_dir, name, fp)
            _barrier(world_size)
            cached = _finished(final, fp, quiet=True)
        if cached is not None:
            log.info("%s: finished earlier (fingerprint %s), skipped", name, fp[:12])
            done.append(cached)
            continue
        if rank == 0 or stage_cfg.distributed:
            _run_stage(stage_cfg, name, fp, recipe, inputs, run_dir, rank, world_size)
        _barrier(world_size)
        done.append(Artifact.load(final))
    return done


def _run_stage(stage_cfg, name: str, fp: str, recipe: Recipe, inputs, run_dir: Path, rank: int, world_size: int) -> None:
    tmp = run_dir / ".tmp" / (name if rank == 0 else f"{name}-rank{rank}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    work_dir = run_dir / ".work" / f"{name}-{fp[:12]}"
    ctx = StageContext(recipe, inputs, run_dir, work_dir, rank, world_size)
    module = importlib.import_module(STAGES[stage_cfg.stage])
    log.info("%s: started", name)
    started = time.time()
    with _elapsed_line(name, started) if rank == 0 else contextlib.nullcontext():
        output = module.run(stage_cfg, ctx, tmp)
    if rank != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        return
    # How texts were read and cut (max_length, truncation side): the data section of the recipe.
    manifest = write_manifest(tmp, output, stage=stage_cfg.stage, fingerprint=fp, config=stage_cfg.model_dump(mode="json"),
                              inputs=inputs, started=started, data=recipe.data.model_dump(mode="json"))
    _publish(tmp, run_dir / name)
    shutil.rmtree(work_dir, ignore_errors=True)
    size_mb = sum(f["bytes"] for f in manifest["files"].values()) / 1e6
    headline = ", ".join(f"{k}={v}" for k, v in output.metrics.items() if isinstance(v, (int, float)))
    log.info("%s: done in %.1f s, %.1f MB%s", name, manifest["timings"]["seconds"], size_mb, f", {headline}" if headline else "")


@contextlib.contextmanager
def _elapsed_line(name: str, started: float):
    """While a stage runs: on a terminal, a live ``NN-stage: running 01:23`` line above the stage's own progress
    bars (a training stage's bar carries its estimate of the time left); with no terminal, a log line a minute."""
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    terminal = sys.stderr.isatty()
    line = tqdm(desc=name, bar_format="{desc}: running {elapsed}", leave=False, disable=not terminal)
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(1 if terminal else HEARTBEAT_S):
            if terminal:
                line.refresh()
            else:
                log.info("%s: still running, %s elapsed", name, tqdm.format_interval(time.time() - started))

    thread = threading.Thread(target=tick, name=f"{name} elapsed", daemon=True)
    thread.start()
    try:
        # On a terminal, log lines are written above the bars rather than through them.
        with logging_redirect_tqdm(loggers=[logging.getLogger()]) if terminal else contextlib.nullcontext():
            yield
    finally:
        stop.set()
        thread.join()
        line.close()
        if terminal:  # a finished nested bar (HF Trainer's) moves up over this line and leaves its old copy below
            with tqdm.get_lock():
                sys.stderr.write("\x1b[2K\r")
