"""What machine this is: versions, CPU, memory, GPUs. Used by ``joules doctor`` and reports.

>>> from joules.system import system_info
>>> info = system_info()
>>> info.logical_cores >= 1
True
"""

from __future__ import annotations

import os
import platform
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


def system_info() -> SystemInfo:
    import psutil
    import torch

    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            gpus.append(GpuInfo(i, props.name, int(props.total_memory)))
    packages = {
        name: _pkg_version(name)
        for name in ("joules", "torch", "transformers", "accelerate", "torchao", "gguf")
    }
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
    )
