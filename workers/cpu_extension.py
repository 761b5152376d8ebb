"""C++ kernels for CPU workers, compiled with the host's compiler on first use.

`torch.utils.cpp_extension` builds each source once and caches it on disk, so later processes
(every Ray worker) load it in well under a second. The code is built for the host CPU
(`-march=native`), so the extension's name carries a fingerprint of the CPU's flags: a cache
directory shared by different machines never hands one the other's instructions. Where no
compiler is found, a build fails, or `RAYLORA_CPU_KERNELS=0`, `module()` is None and callers
use their torch path.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import threading
from functools import cache
from types import ModuleType

logger = logging.getLogger(__name__)

DISABLE_ENV = "RAYLORA_CPU_KERNELS"

_FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fassociative-math", "-fno-signed-zeros")
# `at::parallel_for` splits work over threads only where OpenMP is on at compile time (its
# header is inline); the library resolves to the libgomp torch itself loaded.
_OPENMP_FLAGS = ("-fopenmp",)


class CpuExtension:
    """One C++ source and the functions it exports, built lazily and at most once per process."""

    def __init__(self, name: str, source: str, functions: list[str]) -> None:
        self.name, self.source, self.functions = name, source, functions
        self._lock = threading.Lock()
        self._module: ModuleType | None = None
        self._tried = False

    def module(self) -> ModuleType | None:
        if not self._tried:
            with self._lock:
                if not self._tried:
                    self._module = self._build() if _compiler_allowed() else None
                    self._tried = True
        return self._module

    def _build(self) -> ModuleType | None:
        from torch.utils.cpp_extension import load_inline

        try:
            return load_inline(
                name=f"{self.name}_{_cpu_fingerprint()}", cpp_sources=[self.source], functions=self.functions,
                # fresh lists: torch appends its own link flags to the lists it is given, and a
                # shared list would change the next extension's build command, so processes that
                # build the kernels in another order would rebuild them for each other (~20 s each)
                extra_cflags=[*_FLAGS, *_OPENMP_FLAGS], extra_ldflags=[*_OPENMP_FLAGS], verbose=False,
            )
        except Exception as error:  # noqa: BLE001 - any build failure means: use the torch path
            logger.warning("CPU kernel %s could not be built (%s); using the torch path", self.name, error)
            return None


def cpu_kernels_enabled() -> bool:
    """False where the operator set `RAYLORA_CPU_KERNELS=0`: every CPU fast path then steps aside."""
    return os.environ.get(DISABLE_ENV, "1") != "0"


def _compiler_allowed() -> bool:
    return cpu_kernels_enabled() and shutil.which(os.environ.get("CXX", "c++")) is not None


@cache
def _cpu_fingerprint() -> str:
    flags = ""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line for line in cpuinfo if line.startswith("flags")), "")
    except OSError:
        pass
    return hashlib.sha1(f"{platform.machine()} {flags}".encode()).hexdigest()[:10]
