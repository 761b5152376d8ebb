"""Load a HF safetensors checkpoint into a tensor-parallel model, reading only this rank's slices.

Every parameter carries a `weight_loader(param, source, shard_id=None)`; `source` is a whole
tensor or a lazy safetensors slice, so a rank never materialises a tensor it only needs a part
of. Checkpoint names are mapped onto packed parameters through the model's `packed_modules`
(`q_proj` -> shard "q" of `qkv_proj`, `up_proj` -> shard 1 of `gate_up_proj`). The whole
checkpoint is checked against the model before any tensor is read, so a wrong checkpoint fails
fast with the names at fault.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Protocol, Union

import torch
from safetensors import safe_open
from torch import nn


class TensorSlice(Protocol):
    """What `safe_open(...).get_slice(name)` returns: a shape and lazy indexing."""

    def get_shape(self) -> list[int]: ...

    def __getitem__(self, index: Any) -> torch.Tensor: ...


WeightSource = Union[torch.Tensor, TensorSlice]
ShardId = Union[str, int, None]

# Buffers some exporters write that the model recomputes.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def source_shape(source: WeightSource) -> tuple[int, ...]:
    if isinstance(source, torch.Tensor):
        return tuple(source.shape)
    return tuple(source.get_shape())


def read_slice(source: WeightSource, dim: int, start: int, length: int, full_size: int) -> torch.Tensor:
    """Rows [start, start+length) of `source` along `dim`, after checking `source` has `full_size` there.

    The check matters: safetensors silently truncates an out-of-range slice.
    """
    shape = source_shape(source)
    if len(shape) <= dim or shape[dim] != full_size:
        raise ValueError(f"checkpoint tensor has shape {list(shape)}, expected size {full_size} in dim {dim}")
    if isinstance(source, torch.Tensor):
        return source.narrow(dim, start, length)
    return source[(slice(None),) * dim + (slice(start, start + length),)]


def read_all(source: WeightSource) -> torch.Tensor:
    return source if isinstance(source, torch.Tensor) else source[:]


def copy_checked(destination: torch.Tensor, loaded: torch.Tensor) -> None:
    """Copy (converting dtype and device) after checking the shapes agree."""
    if destination.shape != loaded.shape:
        raise ValueError(f"checkpoint slice has shape {list(loaded.shape)}, parameter expects {list(destination.shape)}")
    destination.copy_(loaded)


def default_weight_loader(param: nn.Parameter, source: WeightSource, shard_id: ShardId = None) -> None:
    """For replicated parameters (norms): every rank loads the whole tensor."""
    if shard_id is not None:
        raise ValueError(f"parameter is not packed, got shard {shard_id!r}")
    copy_checked(param.data, read_all(source))


def checkpoint_index(model_dir: str | Path) -> dict[Path, list[str]]:
    """Tensor names per safetensors file, from the shard index or the single file's header."""
    model_dir = Path(model_dir)
    index_path = model_dir / "model.safetensors.index.json"
    if index_path.exists():
        files: dict[Path, list[str]] = defaultdict(list)
        for name, file_name in json.loads(index_path.read_text())["weight_map"].items():
            files[model_dir / file_name].append(name)
        return dict(files)
    single = model_dir / "model.safetensors"
    if single.exists():
        with safe_open(single, framework="pt") as handle:
            return {single: list(handle.keys())}
    pickled = sorted(path.name for path in model_dir.glob("*.bin"))
    hint = f" (found {', '.join(pickled)}: only safetensors checkpoints are loaded)" if pickled else ""
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {model_dir}{hint}")


def load_weights(model: nn.Module, model_dir: str | Path, dtype: torch.dtype) -> None:
    """Cast `model` to `dtype` and fill every parameter from the checkpoint in `model_dir`."""
    model.to(dtype)
    params = dict(model.named_parameters())
    mapper = _NameMapper(model)
    plan: dict[Path, list[tuple[str, str, ShardId]]] = defaultdict(list)
    unexpected: list[str] = []
    for path, names in checkpoint_index(model_dir).items():
        for name in names:
            if mapper.ignored(name):
                continue
            param_name, shard_id = mapper.to_param(name)
            if param_name in params:
                plan[path].append((name, param_name, shard_id))
            else:
                unexpected.append(name)
    if unexpected:
        raise ValueError(f"checkpoint tensors the model has no parameter for: {_list(unexpected)}")
    planned = {(param_name, shard_id) for entries in plan.values() for _, param_name, shard_id in entries}
    missing = [mapper.to_checkpoint(*key) for key in mapper.expected(params) if key not in planned]
    if missing:
        raise ValueError(f"checkpoint in {model_dir} lacks tensors: {_list(missing)}")
    for path, entries in plan.items():
        with safe_open(path, framework="pt", device="cpu") as handle:
            for name, param_name, shard_id in entries:
                param = params[param_name]
                loader = getattr(param, "weight_loader", default_weight_loader)
                try:
                    loader(param, handle.get_slice(name), shard_id)
                except ValueError as error:
                    raise ValueError(f"{name}: {error}") from error


class _NameMapper:
    """Translates between checkpoint names and (parameter name, packed shard id)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.packed: dict[str, list[str]] = getattr(model, "packed_modules", {})
        config = getattr(model, "config", None)
        self.tied = bool(getattr(config, "tie_word_embeddings", False))

    def ignored(self, name: str) -> bool:
        # Tied checkpoints sometimes still carry a copy of the embedding as lm_head.weight.
        return name.endswith(IGNORED_SUFFIXES) or (self.tied and name == "lm_head.weight")

    def to_param(self, name: str) -> tuple[str, ShardId]:
        for packed_name, members in self.packed.items():
            for index, member in enumerate(members):
                if f".{member}." in name:
                    param_name = name.replace(f".{member}.", f".{packed_name}.")
                    shard_ids = self._shard_ids(param_name)
                    # No such module: the name is reported as unexpected.
                    return param_name, shard_ids[index] if shard_ids else None
        return name, None

    def to_checkpoint(self, param_name: str, shard_id: ShardId) -> str:
        if shard_id is None:
            return param_name
        packed_name = self._packed_name(param_name)
        member = self.packed[packed_name][self._shard_ids(param_name).index(shard_id)]
        return param_name.replace(f".{packed_name}.", f".{member}.")

    def expected(self, params: dict[str, nn.Parameter]) -> list[tuple[str, ShardId]]:
        """Every (parameter, shard) the checkpoint must provide."""
        keys: list[tuple[str, ShardId]] = []
        for param_name in params:
            if self._packed_name(param_name):
                keys += [(param_name, shard_id) for shard_id in self._shard_ids(param_name)]
            else:
                keys.append((param_name, None))
        return keys

    def _packed_name(self, param_name: str) -> str | None:
        parts = param_name.split(".")
        return parts[-2] if len(parts) > 1 and parts[-2] in self.packed else None

    def _shard_ids(self, param_name: str) -> list[ShardId]:
        try:
            module = self.model.get_submodule(param_name.rsplit(".", 1)[0])
        except AttributeError:
            return []
        return list(getattr(module, "shards", {}))


def _list(names: list[str], limit: int = 20) -> str:
    shown = ", ".join(sorted(names)[:limit])
    return shown + (f" ... ({len(names)} in all)" if len(names) > limit else "")
