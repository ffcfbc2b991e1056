"""Where a benchmark ran: CPU model, cores, ISA flags, memory, OS and library versions."""

from __future__ import annotations

import os
import platform

from edgetl.artifact import library_versions
from edgetl.cpu import cpuinfo, isa_flags


def machine_info() -> dict:
    import psutil

    cpu = cpuinfo()
    return {
        "cpu": cpu.get("model name") or platform.processor() or platform.machine(),
        "arch": platform.machine(),
        "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "isa_flags": isa_flags(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "os": f"{platform.system()} {platform.release()}",
        "gpu": gpus(),
        "versions": library_versions(),
    }


def gpus() -> list[str] | None:
    """NVIDIA GPUs as 'name, memory' from nvidia-smi (None where there is none)."""
    import shutil
    import subprocess

    if not shutil.which("nvidia-smi"):
        return None
    done = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                          capture_output=True, text=True, timeout=30)
    return [line.strip() for line in done.stdout.splitlines() if line.strip()] or None if done.returncode == 0 else None


def describe(machine: dict) -> str:
    flags = ", ".join(machine["isa_flags"]) or "none of note"
    gpu = f"; GPU: {', '.join(machine['gpu'])}" if machine.get("gpu") else ""
    return (f"{machine['cpu']} ({machine['usable_cores']} usable cores, {machine['memory_gib']} GiB; "
            f"ISA: {flags}{gpu}; {machine['os']})")
