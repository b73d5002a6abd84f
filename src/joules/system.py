"""What machine this is: versions, CPU, ISA flags, memory, GPUs. Used by ``joules doctor``,
reports and every ``benchmarks/results/*.json``.

    >>> from joules.system import cpu_flags, machine_info, system_info
    >>> info = system_info()
    >>> info.logical_cores >= 1
    True
    >>> set(cpu_flags()) <= set(ISA_FLAGS)
    True
    >>> sorted(machine_info())[:3]
    ['cpu_flags', 'cpu_model', 'gpus']

``cpu_flags()`` names the instruction-set extensions that decide which number formats run fast
here (bf16 matmul is fast only with AVX512-BF16 or AMX on x86; an AVX2-only CPU emulates it).
"""

from __future__ import annotations

import os
import platform
import sys
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    memory_bytes: int


@dataclass(frozen=True)
class SystemInfo:
    """Software versions and hardware of the machine joules runs on."""

    python: str
    platform: str
    packages: dict[str, str]
    cpu_model: str
    physical_cores: int | None
    logical_cores: int
    torch_threads: int
    memory_bytes: int
    gpus: list[GpuInfo] = field(default_factory=list)
    cpu_flags: list[str] = field(default_factory=list)  # relevant ISA extensions, see ISA_FLAGS

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _pkg_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux) or platform.processor()."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


# The ISA extensions that change which kernels (and so which formats) are fast. x86 names are the
# kernel's /proc/cpuinfo names; on ARM, the kernel's "asimd" is reported as "neon".
ISA_FLAGS = (
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "avx_vnni",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
    "neon",
    "asimddp",
    "sve",
    "sve2",
    "bf16",
    "i8mm",
)


def cpu_flags(cpuinfo: str | None = None) -> list[str]:
    """The CPU's relevant ISA extensions (those in ``ISA_FLAGS``), in ``ISA_FLAGS`` order.

    ``cpuinfo``: the text of ``/proc/cpuinfo`` (read from the machine when None). Off Linux the
    flags are unknown and the list is empty, except ``neon``, which every arm64 CPU has.
    """
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text(errors="replace") if path.is_file() else ""
    found: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):  # x86 "flags", ARM "Features"
            found.update(value.split())
            break
    if "asimd" in found:
        found.add("neon")
    if not cpuinfo and platform.machine().lower() in ("arm64", "aarch64"):
        found.add("neon")
    return [f for f in ISA_FLAGS if f in found]


def machine_info() -> dict[str, object]:
    """The machine a result was measured on, for results JSON: CPU model and ISA flags, cores,
    memory, GPUs, Python, platform and package versions.

    Imports torch only to list GPUs and threads when torch is already imported (a benchmark has
    imported it; a torch-free command stays torch-free).
    """
    import psutil

    info: dict[str, object] = {
        "cpu_model": cpu_model(),
        "cpu_flags": cpu_flags(),
        "machine": platform.machine(),
        "physical_cores": psutil.cpu_count(logical=False),
        "logical_cores": os.cpu_count() or 1,
        "memory_bytes": int(psutil.virtual_memory().total),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": _packages(),
        "gpus": [],
    }
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch_threads"] = torch.get_num_threads()
        info["gpus"] = [asdict(g) for g in _torch_gpus(torch)]
    return info


def backfill_machine(data: dict[str, object]) -> dict[str, object]:
    """Give a results JSON written before :func:`machine_info` was recorded (no ``cpu_flags``)
    this machine's, labelled as recorded when its table was re-derived; ``data`` is returned."""
    machine = data.get("machine")
    if not (isinstance(machine, dict) and "cpu_flags" in machine):
        data["machine"] = machine_info() | {"recorded": "when the table was derived (same VM)"}
    return data


def _packages() -> dict[str, str]:
    return {
        name: _pkg_version(name)
        for name in ("joules", "torch", "transformers", "accelerate", "torchao", "gguf")
    }


def _torch_gpus(torch: object) -> list[GpuInfo]:
    cuda = torch.cuda  # type: ignore[attr-defined]
    if not cuda.is_available():
        return []
    return [
        GpuInfo(
            i, cuda.get_device_properties(i).name, int(cuda.get_device_properties(i).total_memory)
        )
        for i in range(cuda.device_count())
    ]


def system_info() -> SystemInfo:
    import psutil
    import torch

    gpus = _torch_gpus(torch)
    packages = _packages()
    return SystemInfo(
        python=platform.python_version(),
        platform=platform.platform(),
        packages=packages,
        cpu_model=cpu_model(),
        physical_cores=psutil.cpu_count(logical=False),
        logical_cores=os.cpu_count() or 1,
        torch_threads=torch.get_num_threads(),
        memory_bytes=int(psutil.virtual_memory().total),
        gpus=gpus,
        cpu_flags=cpu_flags(),
    )
