"""The bundle's models cut at layer boundaries into parts (``edgetl.sharding``): a sharded bundle that loads as any
bundle, its parts running as a pipeline of worker processes."""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from edgetl.artifact import StageOutput
from edgetl.errors import StageError
from edgetl.recipe import ShardStage


def run(cfg: ShardStage, ctx, out_dir: Path) -> StageOutput:
    from edgetl.sharding import shard_bundle

    bundle = ctx.latest("bundle")
    if bundle is None:
        raise StageError("shard: no bundle to shard; add a bundle stage before it")
    with tempfile.TemporaryDirectory(dir=out_dir.parent) as scratch:
        sharded = Path(scratch) / "sharded"  # shard_bundle writes a new folder whole; its content becomes the stage's
        models = shard_bundle(bundle.path, sharded, cfg.parts, cfg.formats, cfg.max_part_mb,
                              log=logging.getLogger("edgetl").info)
        for item in sharded.iterdir():
            shutil.move(item, out_dir / item.name)
    metrics = {f"{backend} part MB": [round(p["bytes"] / 1e6, 1) for p in entry["parts"]]
               for backend, entry in models.items() if "parts" in entry}
    return StageOutput(kind="bundle", precision=bundle.manifest.get("precision"), models=models, metrics=metrics)
