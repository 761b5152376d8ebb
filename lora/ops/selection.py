"""Which LoRA backend a worker runs, decided once when it starts.

`RAYLORA_LORA_OPS=torch|triton` forces the family (Triton on CPU needs `TRITON_INTERPRET=1`
set before the kernels import); unset or `auto`, Triton runs on CUDA where it is installed and
torch everywhere else. On CPU the torch family means the C++ kernel backend where the kernel is
built and the LoRA weights are float32 (`RAYLORA_CPU_KERNELS=0` turns the kernel off), the
plain-torch backend otherwise.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from lora.ops.backend import LoRABackend
from lora.ops.cpu_ops import EXTENSION, CpuKernelBackend
from lora.ops.torch_ops import TorchBackend

BACKEND_ENV = "RAYLORA_LORA_OPS"


def select_backend(num_slots: int, device: torch.device | str, dtype: torch.dtype) -> LoRABackend:
    """The backend for `num_slots` slots of `dtype` weights on `device`."""
    choice = os.environ.get(BACKEND_ENV, "").lower()
    if choice not in ("", "auto", "torch", "triton"):
        raise ValueError(f"{BACKEND_ENV} must be torch, triton or auto, got {choice!r}")
    device = torch.device(device)
    if choice == "triton" or (choice != "torch" and device.type == "cuda" and _triton_installed()):
        from lora.ops.triton_ops import TritonBackend  # imported late: interpret mode is fixed at import

        return TritonBackend(num_slots, device)
    if device.type == "cpu" and dtype == torch.float32 and EXTENSION.module() is not None:
        return CpuKernelBackend(num_slots, device)
    return TorchBackend(num_slots, device)


def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None
