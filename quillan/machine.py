"""What a number was measured on: the CPU model and the instruction-set flags that change which
code paths libraries take (bitsandbytes' INT4 CPU kernel needs AVX512-BF16, oneDNN's int8 GEMM
behind `torch._int_mm` uses AVX512-VNNI or AMX, the native ternary kernel AVX2)."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

# The flags recorded beside every speed measurement (names as in /proc/cpuinfo).
ISA_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8",
             "amx_bf16")


def cpuinfo_fields(cpuinfo: str | None = None) -> dict[str, str]:
    """Each key of `cpuinfo` (default: /proc/cpuinfo) with its first value, i.e. the first
    processor's ('model name' → 'AMD EPYC'); {} where there is no such file (e.g. macOS)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return {}
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_flags() -> set[str]:
    """The CPU's feature flags ('flags', or 'Features' on ARM); empty where unknown."""
    fields = cpuinfo_fields()
    return set((fields.get("flags") or fields.get("Features") or "").split())


def cpu_model() -> str:
    """The CPU's model name ('model name' in /proc/cpuinfo), else what `platform` says."""
    return cpuinfo_fields().get("model name") or platform.processor() or platform.machine()


def cpu_generation(cpuinfo: str | None = None) -> str:
    """Vendor, family and model numbers of the first processor in `cpuinfo` (default: /proc/cpuinfo),
    e.g. 'AuthenticAMD family 26 model 2' (family 26 = 1Ah: Zen 5; 25: Zen 3/4): virtual machines
    often name every AMD part just "AMD EPYC". '' where unknown."""
    fields = cpuinfo_fields(cpuinfo)
    if not {"vendor_id", "cpu family", "model"} <= fields.keys():
        return ""
    return f"{fields['vendor_id']} family {fields['cpu family']} model {fields['model']}"


def cpu_info() -> dict[str, Any]:
    """{"cpu": model name, "cpu_generation": vendor/family/model, "cores": logical CPUs,
    "isa": {flag: present} for ISA_FLAGS}."""
    flags = cpu_flags()
    return {"cpu": cpu_model(), "cpu_generation": cpu_generation(), "cores": usable_cores(),
            "isa": {f: f in flags for f in ISA_FLAGS}}


def usable_cores() -> int:
    """Logical CPUs this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
