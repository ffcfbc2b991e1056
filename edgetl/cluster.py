"""The Ray cluster edgetl's scale-out engines run on (``predict``, ``serve`` and ``search`` with ``--engine ray``):
the one ``RAY_ADDRESS`` names, else a local one started for this process."""

from __future__ import annotations

import os

from edgetl.errors import UsageError


def connect_ray(cpus: int, command: str, extra: str = "ray"):
    """``ray``, initialised: a local cluster gets ``cpus`` CPUs; a remote one brings its own. ``command`` names
    what needs Ray when it is not installed."""
    try:
        import ray
    except ImportError:
        raise UsageError(f"{command} needs Ray: pip install 'edgetl[{extra}]'") from None
    if not ray.is_initialized():
        local = {} if os.environ.get("RAY_ADDRESS") else {"num_cpus": cpus}
        ray.init(include_dashboard=False, log_to_driver=False, logging_level="ERROR", **local)
    return ray
