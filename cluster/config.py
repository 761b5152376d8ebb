"""EngineConfig: every engine argument in one frozen, validated object, loadable from YAML.

The names and defaults follow vLLM's engine arguments so a vLLM command line or config carries over.
Errors name the field and the fix, because a config is written by a person, not a program.
"""

from __future__ import annotations

import difflib
import re
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    model_validator,
)

from cluster.engine.adapter_names import adapter_name_problem

MiB = 1024**2

# Admission bounds by default: a queue a few batches deep, a body that holds any prompt of a long context
# (128k token ids as JSON are about 1 MiB), and one request at most half a default batch.
DEFAULT_MAX_WAITING_REQUESTS = 512
DEFAULT_MAX_REQUEST_BODY_BYTES = 4 * MiB
DEFAULT_MAX_SEQUENCES_PER_REQUEST = 128

LORA_DTYPES = ("auto", "float16", "bfloat16", "float32")
_LORA_DTYPE_ALIASES = {"half": "float16", "float": "float32"}

# LoRA settings that only mean something when enable_lora is true.
LORA_ONLY_FIELDS = (
    "max_loras",
    "max_lora_rank",
    "fully_sharded_loras",
    "max_cpu_loras",
    "lora_extra_vocab_size",
    "lora_dtype",
    "long_lora_scaling_factors",
    "lora_modules",
)

# "MB" is 1000**2 and "MiB" 1024**2; a bare "512M" is refused as ambiguous.
_BYTE_UNITS = {"": 1, "b": 1} | {
    prefix + suffix: base**power
    for power, prefix in enumerate("kmgt", start=1)
    for suffix, base in (("b", 1000), ("ib", 1024))
}


class ConfigError(ValueError):
    """A config file or mapping that cannot become an EngineConfig (bad YAML, unknown keys)."""


def parse_byte_size(value: Any, info: ValidationInfo) -> Any:
    """Turn "512MiB" / "1GiB" / "64MB" / "1_000" into an int byte count; other values pass to pydantic."""
    if not isinstance(value, str):
        return value
    match = re.fullmatch(r"\s*([0-9][0-9_]*(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", value)
    unit = match and match.group(2).lower()
    if not match or unit not in _BYTE_UNITS:
        field = info.field_name or "the byte size"
        raise ValueError(
            f"{field} ({value!r}) is not a byte size: write an integer or a number with a unit, "
            "e.g. 536870912, 512MiB, 1GiB or 64MB"
        )
    return int(float(match.group(1).replace("_", "")) * _BYTE_UNITS[unit])


def format_byte_size(num_bytes: int) -> str:
    """The shortest exact binary-unit spelling, e.g. 536870912 -> "512MiB"."""
    for unit in ("TiB", "GiB", "MiB", "KiB"):
        size = _BYTE_UNITS[unit.lower()]
        if num_bytes and num_bytes % size == 0:
            return f"{num_bytes // size}{unit}"
    return str(num_bytes)


def _split_lora_module(item: Any) -> tuple[Any, Any]:
    """One lora_modules list item as (name, path): "name=path", {name:, path:} or {name: path}."""
    if isinstance(item, str):
        name, sep, path = item.partition("=")
        if not sep:
            raise ValueError(
                f"lora_modules entry {item!r} is not name=path: write it as e.g. pirate=/adapters/pirate"
            )
        return name.strip(), path.strip()
    if isinstance(item, dict) and set(item) <= {"name", "path"} and "name" in item:
        return item.get("name"), item.get("path")
    if isinstance(item, dict) and len(item) == 1:
        return next(iter(item.items()))
    raise ValueError(
        f"lora_modules entry {item!r} is not understood: use name=path or a mapping with keys name and path"
    )


def normalize_lora_modules(value: Any) -> Any:
    """Accept a mapping, or a list of "name=path" strings / {name, path} mappings, as a name -> path dict."""
    if value is None:
        return {}
    if isinstance(value, (list, tuple)):
        pairs = [_split_lora_module(item) for item in value]
        names = [name for name, _ in pairs]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(
                f"lora_modules names {repeated} appear more than once: give each adapter one name"
            )
        return dict(pairs)
    return value


def normalize_lora_dtype(value: Any) -> Any:
    """Lower-case and map torch-style aliases (half, float) onto the allowed names."""
    if isinstance(value, str):
        value = value.strip().lower()
        return _LORA_DTYPE_ALIASES.get(value, value)
    return value


def sort_scaling_factors(factors: tuple[float, ...] | None) -> tuple[float, ...] | None:
    """Ascending, so position i always means the i-th smallest factor; validity is checked with the rest."""
    return None if factors is None else tuple(sorted(factors))


ByteSize = Annotated[int, BeforeValidator(parse_byte_size)]
LoRADtype = Annotated[str, BeforeValidator(normalize_lora_dtype)]
ScalingFactors = Annotated[tuple[float, ...] | None, AfterValidator(sort_scaling_factors)]
LoRAModules = Annotated[dict[str, str], BeforeValidator(normalize_lora_modules)]


class EngineConfig(BaseModel):
    """Engine arguments: model, parallelism, memory, LoRA, scheduling limits and placement on Ray."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Model
    model: str = Field(description="Path of the base model: a local HF-format checkpoint directory.")
    tokenizer: str | None = Field(None, description="Path of the tokenizer; defaults to model.")
    served_model_name: str | None = Field(
        None, description="Name clients use for the base model in requests; defaults to the model string."
    )
    skip_tokenizer_init: bool = Field(
        False,
        description="Load no tokenizer (vLLM's name): prompts must be token ids, outputs carry token ids and "
        "empty text; text prompts, chat and stop strings are refused.",
    )

    # Parallelism and numerics
    tensor_parallel_size: int = Field(1, description="Number of worker actors the base model is split over.")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="Dtype of weights, activations and KV cache; auto is float32 on CPU and the checkpoint's half type (bfloat16 for a float32 checkpoint) on CUDA."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where workers run; auto picks cuda when the Ray cluster has a GPU for every rank, else cpu."
    )

    # Scheduling and memory
    max_model_len: int | None = Field(
        None,
        description="Longest prompt plus completion in tokens; defaults to the model's context length.",
    )
    max_num_seqs: int = Field(256, description="Most sequences in one batch.")
    num_scheduler_steps: int = Field(
        1,
        description="Decode steps a worker runs per call, feeding its sampled tokens back itself; more "
        "amortizes the driver-worker round trip, new requests wait up to that many steps.",
    )
    max_num_batched_tokens: int | None = Field(
        None,
        description="Most tokens in one step (the scheduler's token budget, also what the GPU memory profile "
        "reserves activations for); defaults to 2048 with chunked prefill, else max(max_model_len, 2048).",
    )
    enable_chunked_prefill: bool = Field(
        True,
        description="Mix decode tokens and prefill chunks in one step under max_num_batched_tokens, so an "
        "arriving prompt never stalls running decodes and a prompt longer than the budget is served over "
        "several steps (vLLM's default). Off: a step is either whole new prompts or a decode of all.",
    )
    async_scheduling: bool = Field(
        True,
        description="Schedule and send the next step while the workers run the current one (the workers feed "
        "the tokens still in flight in themselves), hiding the driver-worker round trip; a sequence that "
        "stops on EOS or a stop string then computes one token that is dropped.",
    )
    enable_prefix_caching: bool = Field(
        True,
        description="Reuse the KV blocks of a prompt prefix already computed (vLLM's automatic prefix caching, "
        "on by default as in its V1 engine): full blocks are keyed by SHA-256 over their tokens, their parent "
        "block and the adapter's registration, shared read-only, and kept after use until the memory is needed.",
    )
    block_size: int = Field(16, description="Tokens per KV cache block (a power of 2).")
    gpu_memory_utilization: float = Field(
        0.9, description="Fraction of GPU memory for weights and KV cache on CUDA, in (0, 1]."
    )
    cpu_kv_cache_bytes: ByteSize = Field(
        512 * MiB, description="KV cache budget per worker on CPU, in bytes or with a unit (512MiB, 1GiB)."
    )
    seed: int = Field(
        0, description="Seed of the engine's random sampling; a request's own seed takes precedence."
    )

    # LoRA (vLLM's names and defaults)
    enable_lora: bool = Field(False, description="Serve LoRA adapters next to the base model.")
    max_loras: int = Field(1, description="Most distinct adapters in one batch (GPU slots per worker).")
    max_lora_rank: int = Field(16, description="Highest adapter rank accepted; slot buffers are sized to it.")
    fully_sharded_loras: bool = Field(
        False, description="Shard both LoRA A and B across tensor-parallel ranks instead of one of them."
    )
    max_cpu_loras: int | None = Field(
        None, description="Adapters kept in the CPU cache, at least max_loras; defaults to max_loras."
    )
    lora_extra_vocab_size: int = Field(
        256, description="Extra vocabulary rows per slot for tokens adapters add."
    )
    lora_dtype: LoRADtype = Field(
        "auto", description="Dtype of LoRA weights: auto (the model's), float16, bfloat16, float32."
    )
    long_lora_scaling_factors: ScalingFactors = Field(
        None,
        description="RoPE scaling factors of long-context adapters, positive and distinct (kept sorted).",
    )
    lora_modules: LoRAModules = Field(
        default_factory=dict,
        description="Adapters registered at start, name -> path (or name=path on the CLI).",
    )
    allowed_lora_roots: list[str] = Field(
        default_factory=list,
        description="When set, adapter paths must resolve under one of these directories.",
    )
    allow_runtime_lora_updating: bool = Field(
        False, description="Allow loading and unloading adapters through the HTTP API while serving."
    )
    allow_pickle_adapters: bool = Field(
        False, description="Accept adapter weights stored as pickle (.bin/.pt), which can run code on load."
    )
    expose_adapter_paths: bool = Field(
        False,
        description="Show the base model's and each adapter's filesystem path as `root` in /v1/models (vLLM "
        "does); off, `root` is null so clients learn nothing of the server's filesystem.",
    )
    trust_request_chat_template: bool = Field(
        False,
        description="Let a chat request replace the chat template (chat_template, chat_template_kwargs."
        "chat_template), as vLLM's flag of that name; off, such a request is a 400.",
    )

    # Admission control: what one client or one burst may cost the server
    max_waiting_requests: int | None = Field(
        DEFAULT_MAX_WAITING_REQUESTS,
        description="Bound on the requests waiting for an engine (each engine's queue, and Serve's queue at "
        "each caller of the engine); over it the server answers 503 with Retry-After. None = unbounded.",
    )
    max_request_body_bytes: ByteSize = Field(
        DEFAULT_MAX_REQUEST_BODY_BYTES,
        description="Largest HTTP request body, in bytes or with a unit (4MiB); a larger one is refused with "
        "413 before it is read whole.",
    )
    max_sequences_per_request: int = Field(
        DEFAULT_MAX_SEQUENCES_PER_REQUEST,
        description="Most sequences one HTTP request may generate (prompts x n); more is refused with 400.",
    )

    # Placement on Ray
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Ray placement group strategy for the worker bundles."
    )
    num_cpus_per_worker: float = Field(1.0, description="CPUs Ray reserves for each worker actor.")
    torch_threads_per_worker: int | None = Field(
        None, description="torch threads in each worker; defaults to cores // tensor_parallel_size on CPU."
    )

    # Streaming
    stream_interval_ms: float = Field(
        50.0, ge=0,
        description="How long a streamed request's new tokens are held so that one streamed item (Ray object, "
        "server-sent event) carries several steps, as Ray Serve LLM's stream batching interval; a hold ends "
        "at the first step past it, and the first token and the last item are never held. 0 = one item per "
        "step.",
    )
    max_stream_items_per_s: float = Field(
        200.0, ge=0,
        description="Most streamed items per second one engine's open streams send together: with more "
        "streams open than that allows at stream_interval_ms, each stream's interval stretches to keep to "
        "it, so the per-item cost of the path to the client (Serve's proxy: ~0.9 ms of CPU an item on a "
        "2-core host) stays bounded at saturation. The first token and the last item are never held. "
        "Raise it where the proxy has cores to spare; 0 = no bound.",
    )

    @model_validator(mode="after")
    def _check(self) -> EngineConfig:
        problems = _find_problems(self)
        if problems:
            raise ValueError("; ".join(problems))
        ignored = self._lora_settings_without_lora()
        if ignored:
            warnings.warn(
                f"LoRA settings {', '.join(ignored)} are ignored because enable_lora is false: "
                "set enable_lora: true (--enable-lora) to serve adapters",
                UserWarning,
                stacklevel=2,
            )
        return self

    def _lora_settings_without_lora(self) -> list[str]:
        if self.enable_lora:
            return []
        fields = type(self).model_fields
        return [
            name
            for name in LORA_ONLY_FIELDS
            if name in self.model_fields_set
            and getattr(self, name) != fields[name].get_default(call_default_factory=True)
        ]

    @property
    def resolved_max_cpu_loras(self) -> int:
        return self.max_loras if self.max_cpu_loras is None else self.max_cpu_loras

    @property
    def resolved_tokenizer(self) -> str:
        return self.tokenizer or self.model

    @property
    def resolved_served_model_name(self) -> str:
        return self.served_model_name or self.model

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> EngineConfig:
        """Build from a mapping (YAML, Serve config), refusing unknown keys with a did-you-mean hint."""
        return cls(**check_keys(data, source))

    @classmethod
    def from_yaml(cls, path: str | Path) -> EngineConfig:
        return cls(**read_config_yaml(path))

    def to_yaml_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict that from_dict turns back into an equal config (for Ray and Serve configs)."""
        return self.model_dump(mode="json")


def _find_problems(config: EngineConfig) -> list[str]:
    """Every invalid value, each phrased as "field (value) must ...: fix"."""
    problems = [
        f"{name} ({getattr(config, name)}) must be >= 1: set it to a positive number"
        for name in ("tensor_parallel_size", "max_num_seqs", "num_scheduler_steps", "max_loras", "max_lora_rank",
                     "max_request_body_bytes", "max_sequences_per_request")
        if getattr(config, name) < 1
    ]
    problems += [
        f"{name} ({getattr(config, name)}) must be >= 1: set a positive number or leave it unset"
        for name in (
            "max_model_len",
            "max_num_batched_tokens",
            "max_waiting_requests",
            "torch_threads_per_worker",
        )
        if getattr(config, name) is not None and getattr(config, name) < 1
    ]
    if config.block_size < 1 or config.block_size & (config.block_size - 1):
        problems.append(f"block_size ({config.block_size}) must be a positive power of 2: use e.g. 16 or 32")
    if not 0 < config.gpu_memory_utilization <= 1:
        problems.append(
            f"gpu_memory_utilization ({config.gpu_memory_utilization}) must be in (0, 1]: use e.g. 0.9"
        )
    if config.cpu_kv_cache_bytes < 1:
        problems.append(f"cpu_kv_cache_bytes ({config.cpu_kv_cache_bytes}) must be positive: use e.g. 512MiB")
    if config.num_cpus_per_worker <= 0:
        problems.append(f"num_cpus_per_worker ({config.num_cpus_per_worker}) must be > 0: use e.g. 1")
    if config.max_cpu_loras is not None and config.max_cpu_loras < config.max_loras:
        problems.append(
            f"max_cpu_loras ({config.max_cpu_loras}) must be >= max_loras ({config.max_loras}): "
            "raise max_cpu_loras or lower max_loras"
        )
    if config.lora_extra_vocab_size < 0:
        problems.append(f"lora_extra_vocab_size ({config.lora_extra_vocab_size}) must be >= 0: use 0 or more")
    if config.lora_dtype not in LORA_DTYPES:
        problems.append(f"lora_dtype ({config.lora_dtype!r}) is unknown: use one of {', '.join(LORA_DTYPES)}")
    factors = config.long_lora_scaling_factors
    if factors is not None and any(factor <= 0 for factor in factors):
        problems.append(
            f"long_lora_scaling_factors {list(factors)} must all be > 0: remove the non-positive ones"
        )
    if factors is not None and len(set(factors)) != len(factors):
        problems.append(
            f"long_lora_scaling_factors {list(factors)} contains duplicates: list each factor once"
        )
    problems += [
        f"lora_modules entry {name!r} ({path!r}) needs a non-empty name and path: write it as name=path"
        for name, path in config.lora_modules.items()
        if not name.strip() or not path.strip()
    ]
    problems += [
        f"lora_modules: {problem}"
        for name in config.lora_modules
        if name.strip() and (problem := adapter_name_problem(name)) is not None
    ]
    return problems


def check_keys(data: Any, source: str = "config") -> dict[str, Any]:
    """Accept kebab-case keys and refuse unknown ones, naming the closest valid key for each."""
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source} must be a mapping of engine arguments (key: value), not {type(data).__name__}"
        )
    data = {str(key).replace("-", "_"): value for key, value in data.items()}
    valid = list(EngineConfig.model_fields)
    hints = []
    for key in data:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
            hints.append(f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key))
    if hints:
        raise ConfigError(
            f"{source} has unknown key(s) {', '.join(hints)}: fix the spelling or remove them "
            "(`raylora serve --help` lists every engine argument)"
        )
    return data


def read_config_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML file of engine arguments into a checked mapping (not yet validated values)."""
    try:
        with open(path) as stream:  # a stream, so YAML errors name the file
            data = yaml.safe_load(stream)
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror or err}") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {' '.join(str(err).split())}") from err
    return check_keys({} if data is None else data, source=f"config file {path}")


def describe_config_error(err: Exception) -> str:
    """One readable paragraph for a ConfigError or ValidationError, without pydantic's boilerplate."""
    if not isinstance(err, ValidationError):
        return str(err)
    parts = []
    for error in err.errors(include_url=False):
        message = error["msg"].removeprefix("Value error, ")
        field = ".".join(str(part) for part in error["loc"])
        if error["type"] == "missing":
            parts.append(
                f"{field} is required: set `{field}:` in the YAML or pass --{field.replace('_', '-')}"
            )
        elif field and not message.startswith(field.split(".")[0]):
            parts.append(f"{field} ({error['input']!r}): {message}")
        else:
            parts.append(message)
    return "invalid engine config: " + "; ".join(parts)
