"""Facts about the machine a run or a benchmark runs on: device name, load, package versions, bf16 support."""

from __future__ import annotations

import os
import platform
from collections.abc import Iterable
from importlib import metadata
from typing import Any

CPUINFO = "/proc/cpuinfo"
# The /proc/cpuinfo flags that mean native bf16 arithmetic: AVX-512 BF16 or AMX on x86 ("flags" lines),
# the Armv8.6 BF16 instructions on arm ("Features" lines).
BF16_FLAGS = {"flags": {"avx512_bf16", "amx_bf16"}, "Features": {"bf16"}}


def _cpuinfo_fields(cpuinfo: str | None) -> Iterable[tuple[str, str]]:
    """(key, value) of each line of ``cpuinfo`` (default: /proc/cpuinfo's text; none where it is absent)."""
    if cpuinfo is None:
        try:
            with open(CPUINFO) as f:
                cpuinfo = f.read()
        except OSError:  # not Linux
            cpuinfo = ""
    for line in cpuinfo.splitlines():  # the stdlib has no cpuinfo parser: each line is "key<tabs>: value"
        key, sep, value = line.partition(":")
        if sep:
            yield key.strip(), value.strip()


def cpu_name(cpuinfo: str | None = None) -> str:
    """The CPU model, as /proc/cpuinfo names it (``platform.processor()`` is often empty on Linux)."""
    name = next((value for key, value in _cpuinfo_fields(cpuinfo) if key == "model name"), "")
    return name or platform.processor() or platform.machine()


def device_name(device: Any = "cpu") -> str:
    """The CUDA card's name for a CUDA device, else the CPU model."""
    import torch

    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def cpu_has_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU computes bf16 natively; without it torch emulates bf16, many times slower than fp32.
    Unknown (no /proc/cpuinfo): False."""
    return any(BF16_FLAGS.get(key, set()) & set(value.split()) for key, value in _cpuinfo_fields(cpuinfo))


def load_average() -> list[float] | None:
    """The 1, 5 and 15-minute load averages (None where the OS has none): other work skews every timing."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def package_versions(packages: Iterable[str]) -> dict[str, str]:
    """Python's version and each installed package's ("not installed" for a missing one)."""
    versions = {"python": platform.python_version()}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions
