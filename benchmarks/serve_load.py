"""Load test of `edgetl serve` on loopback: concurrent clients, one text per request, bounded in count and time.

    .venv/bin/python benchmarks/serve_load.py runs/sst-int8/06-bundle --backend onnxruntime --concurrency 16 \
        --requests 4000 --out benchmarks/results/sst-int8

Starts `edgetl serve BUNDLE --port 0` (with `--engine ray --replicas N`: Ray Serve replicas), sends the SST-2 dev sentences round-robin from `concurrency` threads
(one keep-alive connection each), stops it with SIGTERM and prints throughput, latency percentiles, errors
and the server's exit status as JSON. Only the standard library on the client side.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def start_server(bundle: Path, *args: str, timeout: float = 120) -> tuple[subprocess.Popen, int]:
    """`edgetl serve BUNDLE --port 0 ARGS`, and the port it printed once it listens."""
    process = subprocess.Popen([sys.executable, "-m", "edgetl", "serve", str(bundle), "--port", "0", *args],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    deadline = time.monotonic() + timeout
    line = process.stdout.readline()  # "edgetl serve: ... on http://127.0.0.1:PORT"
    if "http://" not in line:
        process.kill()
        raise RuntimeError(f"edgetl serve did not start: {line}{process.stderr.read()}")
    port = int(line.rsplit(":", 1)[1])
    while time.monotonic() < deadline:  # the port is bound before uvicorn accepts: wait for /health
        try:
            status, _ = request("127.0.0.1", port, "GET", "/health")
            if status == 200:
                return process, port
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"edgetl serve did not answer /health within {timeout} s")


def stop_server(process: subprocess.Popen, timeout: float = 60) -> tuple[int, str]:
    """SIGTERM, then the exit status and stderr (uvicorn finishes requests in flight first)."""
    process.send_signal(signal.SIGTERM)
    try:
        _, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        _, stderr = process.communicate()
        return -9, stderr
    return process.returncode, stderr


def request(host: str, port: int, method: str, path: str, body: bytes | None = None,
            headers: dict | None = None, connection: http.client.HTTPConnection | None = None, timeout: float = 30):
    """(status, parsed JSON body) of one request, on ``connection`` if given."""
    conn = connection or http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        data = response.read()
        return response.status, json.loads(data) if data else None
    finally:
        if connection is None:
            conn.close()


def run_load(port: int, texts: list[str], requests: int, concurrency: int, time_limit: float = 300) -> dict:
    """``requests`` POST /predict calls of one text each from ``concurrency`` threads; stops at ``time_limit``."""
    latencies: list[float] = []
    errors: list[str] = []
    counter = iter(range(requests))
    lock = threading.Lock()
    deadline = time.monotonic() + time_limit

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            while time.monotonic() < deadline:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                body = json.dumps({"text": texts[i % len(texts)]}).encode()
                start = time.perf_counter()
                try:
                    status, payload = request("127.0.0.1", port, "POST", "/predict", body, connection=conn)
                except (OSError, http.client.HTTPException, json.JSONDecodeError) as exc:
                    status, payload = None, repr(exc)
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                elapsed = time.perf_counter() - start
                with lock:
                    if status == 200 and "label" in payload.get("prediction", {}):
                        latencies.append(elapsed)
                    else:
                        errors.append(f"{status}: {payload}")
        finally:
            conn.close()

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    ms = np.asarray(latencies) * 1e3
    return {
        "requests": requests, "concurrency": concurrency, "completed": len(latencies), "errors": len(errors),
        "first_errors": errors[:5], "unsent": requests - len(latencies) - len(errors), "wall_s": round(wall, 3),
        "throughput_per_s": round(len(latencies) / wall, 1),
        **{f"p{q}_ms": round(float(np.percentile(ms, q)), 2) if len(ms) else None for q in (50, 90, 99)},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--time-limit", type=float, default=300)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--engine", choices=["uvicorn", "ray"], default="uvicorn", help="edgetl serve --engine")
    parser.add_argument("--replicas", type=int, help="with --engine ray: edgetl serve --replicas")
    parser.add_argument("--threads", type=int, help="edgetl serve --threads (per replica with --engine ray)")
    parser.add_argument("--out", type=Path, help="folder for serve_load-<backend>-c<concurrency>.json "
                                                 "(serve_load-<backend>-ray<replicas>-c<concurrency>.json on Ray)")
    parser.add_argument("--dev", type=Path, default=Path(os.environ.get("EDGETL_DATA_DIR", REPO.parent / "shared/datasets"))
                        / "sst2" / "dev.tsv", help="texts to send (first TSV column; default: SST-2 dev)")
    args = parser.parse_args()
    lines = args.dev.read_text(encoding="utf-8").splitlines()[1:]
    texts = [line.split("\t")[0] for line in lines if line.strip()]
    extra = ["--engine", args.engine] + (["--replicas", str(args.replicas)] if args.replicas else []) + (
        ["--threads", str(args.threads)] if args.threads else [])
    process, port = start_server(args.bundle, "--backend", args.backend, *extra, timeout=300)
    try:
        _, meta = request("127.0.0.1", port, "GET", "/metadata")
        result = run_load(port, texts, args.requests, args.concurrency, args.time_limit)
    finally:
        code, stderr = stop_server(process)
    from edgetl.bench.machine import describe, machine_info

    result.update(bundle=str(args.bundle), backend=meta["backend"], engine=args.engine, replicas=args.replicas,
                  threads=args.threads, server_exit=code,
                  server_log=stderr.strip().splitlines()[-2:], machine=describe(machine_info()))
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        engine = f"-ray{args.replicas or 2}" if args.engine == "ray" else ""
        (args.out / f"serve_load-{result['backend']}{engine}-c{args.concurrency}.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0 if result["errors"] == 0 and result["unsent"] == 0 and code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
