"""Where a benchmark ran: CPU model, cores, ISA flags, memory, OS and library versions."""

from __future__ import annotations

import os
import platform
from pathlib import Path

from edgetl.artifact import library_versions

# ISA extensions that decide INT8 and FP32 speed on x86 (VNNI/AMX) and Arm (dotprod/i8mm).
NOTABLE_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8",
                 "amx_bf16", "asimddp", "i8mm", "sve")


def _cpuinfo() -> dict[str, str]:
    path = Path("/proc/cpuinfo")
    if not path.is_file():
        return {}
    info = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition(":")
        key = key.strip()
        if sep and key not in info:
            info[key] = value.strip()
    return info


def isa_flags() -> list[str]:
    """The notable ISA extensions of this CPU (empty where /proc/cpuinfo is missing)."""
    cpu = _cpuinfo()
    flags = set((cpu.get("flags") or cpu.get("Features") or "").split())
    return [f for f in NOTABLE_FLAGS if f in flags]


def machine_info() -> dict:
    import psutil

    cpu = _cpuinfo()
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
