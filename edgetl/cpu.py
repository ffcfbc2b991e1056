"""What this CPU can do: its /proc/cpuinfo and the ISA extensions that decide INT8, bf16 and FP32 speed."""

from __future__ import annotations

from pathlib import Path

# ISA extensions that decide INT8 and FP32 speed on x86 (VNNI/AMX) and Arm (dotprod/i8mm).
NOTABLE_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8",
                 "amx_bf16", "asimddp", "i8mm", "sve")


def cpuinfo() -> dict[str, str]:
    """The first value of each /proc/cpuinfo key (empty where the file is missing)."""
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
    cpu = cpuinfo()
    flags = set((cpu.get("flags") or cpu.get("Features") or "").split())
    return [f for f in NOTABLE_FLAGS if f in flags]
