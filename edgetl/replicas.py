"""``edgetl serve --engine ray``: the bundle's HTTP service as replicas on Ray Serve.

Each replica loads the bundle and runs the same Starlette app as ``edgetl serve`` (``edgetl.runtime.server``), so
requests, answers and errors are the same; Ray Serve's proxy spreads requests over the replicas. A local Ray cluster
is started unless ``RAY_ADDRESS`` names one.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
from pathlib import Path

from edgetl.errors import UsageError

log = logging.getLogger("edgetl")


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def serve_on_ray(bundle: str | Path, host: str = "127.0.0.1", port: int = 8000, replicas: int = 2,
                 backend: str = "auto", threads: int | None = None, public_key=None, **app_options) -> None:
    """Serve ``bundle`` with ``replicas`` Ray Serve replicas of ``threads`` inference threads each (default 1)
    until SIGINT/SIGTERM. Port 0 picks a free port; the address is printed first, as ``edgetl serve`` prints it."""
    try:
        from ray import serve
    except ImportError:
        raise UsageError("serve --engine ray needs Ray Serve: pip install 'edgetl[ray]'") from None
    from edgetl.cluster import connect_ray
    from edgetl.runtime import load

    if replicas < 1:
        raise UsageError(f"--replicas {replicas}: at least 1")
    folder = str(Path(bundle).resolve())
    threads = threads or 1
    runtime = load(folder, backend=backend, threads=1, public_key=public_key)  # a bad bundle fails here, once
    backend_name = runtime.backend
    del runtime

    def app():  # built on each replica
        from edgetl.runtime import load
        from edgetl.runtime.server import create_app

        return create_app(load(folder, backend=backend, threads=threads, public_key=public_key), **app_options)

    # The proxy must answer its readiness check within 5 s by default: on a busy 2-core machine its start-up
    # alone takes longer, and Ray kills and restarts it until serve.start gives up. (Set before a local cluster
    # starts, so its processes inherit it.)
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
    ray = connect_ray(replicas * threads, "serve --engine ray")
    logging.getLogger("ray.serve").setLevel(logging.ERROR)
    port = port or _free_port(host)
    serve.start(http_options={"host": host, "port": port})
    deployment = serve.deployment(serve.ingress(app)(), name="edgetl", num_replicas=replicas,
                                  ray_actor_options={"num_cpus": threads})
    serve.run(deployment.bind(), name="edgetl", route_prefix="/")
    print(f"edgetl serve: {folder} ({backend_name}) on http://{host}:{port}", flush=True)
    log.info("edgetl serve: %d replicas on Ray Serve", replicas)
    stop = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)
    try:
        signal.sigwait(stop)
    finally:
        serve.shutdown()
        ray.shutdown()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, stop)
    log.info("edgetl serve: shut down cleanly")
