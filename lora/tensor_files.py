"""An adapter's tensor files, read whole (a worker loading weights) or as names, shapes and dtypes
only (the driver describing an adapter), so that the driver never holds an adapter's values.

Both readers refuse the same broken files with the same words: `safe_open` parses and checks the
safetensors header exactly as `load_file` does, offsets against the file's size included, so a
truncated file or a lying header is refused before any tensor data is touched.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lora.adapter_config import AdapterProblem

# safetensors' dtype names; one torch lacks stays a string (and is not a float type).
_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "C64": torch.complex64,
}


@dataclass(frozen=True)
class TensorSpec:
    """What validation needs to know of a stored tensor, none of its values."""

    shape: tuple[int, ...]
    dtype: torch.dtype | str

    @property
    def is_floating_point(self) -> bool:
        return isinstance(self.dtype, torch.dtype) and self.dtype.is_floating_point


@dataclass(frozen=True)
class TensorFile:
    """A tensor file of an adapter: safetensors, or (operator's opt-in) a torch pickle."""

    path: Path
    pickled: bool

    def read_specs(self) -> dict[str, TensorSpec]:
        """Every tensor's shape and dtype, its data left on disk."""
        if not self.pickled:
            with _read_errors(self.path.name), safe_open(self.path, framework="pt") as header:
                return {key: _spec_of_slice(header.get_slice(key)) for key in header.keys()}  # noqa: SIM118
        # a zip-format pickle maps its storages instead of reading them; the legacy format cannot
        return specs_of(self._load_pickle(mmap=zipfile.is_zipfile(self.path)))

    def read_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor, read into memory on CPU."""
        if not self.pickled:
            with _read_errors(self.path.name):
                return load_file(self.path, device="cpu")
        return self._load_pickle(mmap=False)

    def _load_pickle(self, mmap: bool) -> dict[str, torch.Tensor]:
        with _read_errors(self.path.name):
            loaded = torch.load(self.path, map_location="cpu", weights_only=True, mmap=mmap)
        if not isinstance(loaded, dict) or not all(isinstance(t, torch.Tensor) for t in loaded.values()):
            raise AdapterProblem(f"{self.path.name} is not a mapping of names to tensors: save the adapter again")
        return loaded


@contextmanager
def _read_errors(filename: str) -> Iterator[None]:
    """A reader's error (safetensors and the unpickler raise many types) as an AdapterProblem."""
    try:
        yield
    except Exception as err:
        raise AdapterProblem(f"{filename} cannot be read ({_reason(err)}): save the adapter again",
                             detail=f"{type(err).__name__}: {err}") from None


def specs_of(tensors: dict[str, torch.Tensor]) -> dict[str, TensorSpec]:
    return {key: TensorSpec(tuple(tensor.shape), tensor.dtype) for key, tensor in tensors.items()}


def _spec_of_slice(view: object) -> TensorSpec:
    name = view.get_dtype()  # type: ignore[attr-defined]
    return TensorSpec(tuple(view.get_shape()), _SAFETENSORS_DTYPES.get(name, name))  # type: ignore[attr-defined]


def _reason(err: Exception) -> str:
    """What a reader's error says, without the file names an OSError carries."""
    if isinstance(err, OSError):
        return err.strerror or type(err).__name__
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    return text if "/" not in text and "\\" not in text else type(err).__name__
